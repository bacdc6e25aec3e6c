"""jumprelu export WORKDIR OUT [--format F] [--member i] [--step N] [--hub REPO] [--store PATH] [--top K]

Writes a trained SAE in a file format other tools read:
  gemma-scope    Gemma Scope's params.npz (folded W_enc, b_enc, threshold, W_dec, b_dec);
                 JumpReLU, ReLU, Gated and BatchTopK SAEs are exact; TopK is refused
  saelens        a directory sae_lens.SAE.load_from_disk reads (cfg.json, sae_weights.safetensors);
                 every kind (TopK as SAELens's topk)
  gemma-scope-2  a Gemma Scope 2 folder (params.safetensors, config.json); TopK is refused
  neuronpedia    feature statistics for dashboards: firing frequencies and each latent's top
                 activations on the held-out rows (token contexts where the store's harvest
                 can be replayed)
--hub REPO writes the SAELens directory OUT with a model card and pushes it to the Hugging Face
Hub repository REPO (needs huggingface_hub and a token).
"""

from __future__ import annotations

import argparse
import os
import zipfile

from jumprelu import errors
from jumprelu.cli import common

FORMATS = ("gemma-scope", "saelens", "gemma-scope-2", "neuronpedia")
FILE_FORMATS = ("gemma-scope",)  # one file; the others write a directory
# what each directory format writes: an existing OUT holding only these is an earlier export, which is
# replaced; anything else in it (a model's config.json, a project's README.md) would be overwritten or,
# with --hub, uploaded
_WRITES = {
    "saelens": {"cfg.json", "sae_weights.safetensors"},
    "gemma-scope-2": {"config.json", "params.safetensors"},
    "neuronpedia": {"feature_stats.json", "features.jsonl"},
}
_MARKER = {"saelens": "sae_weights.safetensors", "gemma-scope-2": "params.safetensors", "neuronpedia": "features.jsonl"}
_HUB_FILES = {"README.md", "jumprelu_export.json"}  # beside one SAELens folder per sae_id
# names the loader reads as a file of another layout (jumprelu.load routes on the suffix)
_FILE_SUFFIXES = (".npz", ".safetensors", ".json", ".jsonl", ".npy")


def check_output(path: str, fmt: str, hub: bool = False) -> None:
    """A one-line UserError, before any work, when OUT cannot be written in this format."""
    from jumprelu import fs
    from jumprelu.errors import UserError

    if path.strip() in ("", "-"):  # "-" is stdout to most tools: it was written as a file named "-"
        raise UserError(f"OUT {path!r}: export writes files, not to stdout; give a file or directory path")
    if fmt not in FILE_FORMATS and _is_training_dir(path):  # its config.json would be replaced
        raise UserError(f"{path}: is a training workdir; --format {fmt} writes its files into another directory")
    name = os.path.basename(path.rstrip("/"))
    if fmt in FILE_FORMATS:
        if path.endswith("/") or (not fs.is_remote(path) and os.path.isdir(path)):
            raise UserError(
                f"{path}: is a directory; --format {fmt} writes one file (e.g. {fs.join(path, 'params.npz')})"
            )
        if name.endswith(_FILE_SUFFIXES) and not name.endswith(".npz"):
            suffix = name.rsplit(".", 1)[1]
            raise UserError(f"{path}: --format {fmt} writes an .npz archive, not a .{suffix} file; name it .npz")
    elif name.endswith(_FILE_SUFFIXES):
        suffix = name.rsplit(".", 1)[1]
        raise UserError(f"{path}: --format {fmt} writes a directory, which a .{suffix} name would load as a file")
    if fs.is_remote(path):
        return
    # an earlier export (an .npz archive) is replaced; any other file (a run's report, the activations)
    # would be lost to it
    if fmt in FILE_FORMATS and os.path.exists(path) and not _is_sae_archive(path):
        replace = f"--format {fmt} would replace it (give another path)"
        raise UserError(f"{path}: exists and is not an SAE's .npz (W_enc, W_dec, ...); {replace}")
    if fmt not in FILE_FORMATS and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{path}: is a file; --format {fmt} writes a directory")
    if fmt not in FILE_FORMATS and os.path.isdir(path):
        foreign = _foreign_entries(path, fmt, hub)
        if foreign:
            what = "--hub writes and uploads this directory" if hub else f"--format {fmt} writes into it"
            raise UserError(
                f"{path}: holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which no earlier "
                f"export wrote; {what} (give a new or empty directory)"
            )


def _foreign_entries(path: str, fmt: str, hub: bool) -> list[str]:
    """The entries of an existing OUT directory that an export in this format did not write."""
    names = sorted(n for n in os.listdir(path) if ".tmp." not in n)  # a killed write's temporary (fs)
    if not hub:
        ours = names and _MARKER[fmt] in names  # a config.json alone may be a model's, not an export's
        return [n for n in names if n not in _WRITES[fmt] or not ours]
    if names and "jumprelu_export.json" not in names:  # not an earlier --hub export: it must be empty
        return names
    foreign = []
    for n in names:
        sub = os.path.join(path, n)
        is_saelens_folder = os.path.isdir(sub) and set(os.listdir(sub)) <= _WRITES["saelens"]
        if n not in _HUB_FILES and not is_saelens_folder:
            foreign.append(n)
    return foreign


def _is_sae_archive(path: str) -> bool:
    """Whether `path` is an .npz holding an SAE's parameters (an earlier export, which may be
    replaced), by its members, whatever its name: not a run's report, nor saved activations."""
    try:
        with zipfile.ZipFile(path) as z:
            return {"W_enc.npy", "W_dec.npy"} <= set(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _is_training_dir(path: str) -> bool:
    """Whether `path` (local or gs://) is a run's workdir or a stacked member's directory."""
    from jumprelu import fs
    from jumprelu.train.checkpoint import MEMBER_FILE

    return fs.exists(fs.join(path, "checkpoints")) or fs.exists(fs.join(path, MEMBER_FILE))


def run(argv: list[str]) -> int:
    p = errors.ArgumentParser(  # the whole docstring: the formats and the kinds each refuses
        prog="jumprelu export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("workdir", help="training workdir (or a stacked run's WORKDIR/sae-i)")
    p.add_argument("output", help="file or directory to write")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: gemma-scope (saelens with --hub)")
    p.add_argument("--member", type=int, default=None, help="which SAE of a stacked run")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--hub", metavar="REPO", default=None, help="push the SAELens directory to this Hub repo")
    p.add_argument("--top", type=int, default=20, help="neuronpedia: top activations kept per latent")
    p.add_argument(
        "--store", default=None, help="the run's store, where it moved to (neuronpedia's rows, the held-out l0)"
    )
    args = p.parse_args(common.underscore_flags(argv))
    common.quiet_orbax_teardown()
    fmt = args.format or ("saelens" if args.hub else "gemma-scope")
    from jumprelu import fs
    from jumprelu.errors import UserError
    from jumprelu.export import gemma_scope, gemma_scope_2, hub, neuronpedia, saelens
    from jumprelu.export.load import load, require_workdir, resolve

    try:
        if args.hub and fmt != "saelens":
            raise UserError(f"--hub pushes a SAELens directory; --format {fmt} cannot be pushed")
        if args.store and fmt in ("gemma-scope", "saelens") and not args.hub:  # it was ignored silently
            raise UserError(
                f"--store is read by --format gemma-scope-2 and neuronpedia, and by --hub; --format {fmt} "
                "writes the weights alone"
            )
        check_output(args.output, fmt, hub=bool(args.hub))
        if args.hub:
            hub.require_client()  # before OUT is written: no model card left behind for a push that cannot happen
        if args.top <= 0:
            raise UserError(f"--top must be a positive number of activations kept per latent, found {args.top}")
        sae = load(args.workdir, step=args.step, member=args.member)
        if fmt == "gemma-scope":
            fs.makedirs(os.path.dirname(fs.abspath(args.output)))  # as the directory formats make theirs
            gemma_scope.export(sae, args.output)
        elif fmt == "saelens" and args.hub:
            hub.write_repo_dir(
                sae, args.output, args.hub, {"eval": held_out_eval(args.workdir, sae, args.member, args.store)}
            )
        elif fmt == "saelens":
            saelens.export(sae, args.output)
        elif fmt == "gemma-scope-2":
            gemma_scope_2.export(
                sae, args.output, l0=held_out_eval(args.workdir, sae, args.member, args.store).get("l0")
            )
        else:
            require_workdir(sae, args.workdir, "--format neuronpedia")
            workdir, _ = resolve(args.workdir, args.member)
            rows, coords, store_path = neuronpedia.eval_rows(workdir, sae.config, args.store)
            header = neuronpedia.export(sae, args.output, rows, coords, _contexts(store_path), top=args.top)
            if not header["has_contexts"]:
                print(
                    f"{store_path}: no harvest this can replay (a converted, synthetic or multi-process store), "
                    "so no token contexts (top rows by index only)"
                )
    except (UserError, FileNotFoundError, ValueError) as err:
        return common.fail(err)
    except OSError as err:  # a full disk, no permission: the error names the file
        return common.fail(f"{args.output}: not written: {err}")
    print(f"wrote {args.output} ({fmt}): d_model {sae.d_model}, width {sae.width}, step {sae.step}")
    if args.hub:
        try:
            url = hub.push(args.output, args.hub)
        except Exception as err:  # the Hub's HTTP errors span lines; the first names the status
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            return common.fail(f"{args.output} was written but the push to {args.hub} failed: {first}")
        print(f"pushed {args.output} to {url}")
    return 0


def held_out_eval(path: str, sae, member: int | None, store: str | None = None) -> dict:
    """The held-out metrics of exactly this SAE (its step, refit or not): those recorded when the
    run's report.json or refit.json is of it, else measured now on the run's held-out rows
    (`--step N` before the end); {} for a released file, which carries none."""
    from jumprelu.cli.evaluate import evaluate_workdir
    from jumprelu.errors import UserError
    from jumprelu.export.load import from_workdir, recorded_eval

    recorded = recorded_eval(path, sae, member)
    if recorded or not from_workdir(sae):
        return recorded
    try:
        return evaluate_workdir(path, member, step=sae.step, store=store, command="jumprelu export")[1]["stored"]
    except UserError as err:  # the store moved or is gone: the metrics are optional, the SAE is not
        print(f"no held-out metrics in the export (its l0 is left empty): {err}")
        return {}


def _contexts(store_path: str):
    """Token contexts by replaying the store's harvest, when it was harvested (needs the gemma extra)."""
    try:
        from jumprelu.harvest.contexts import store_contexts
    except ImportError:
        return None
    return store_contexts(store_path)


if __name__ == "__main__":  # python -m jumprelu.cli.export is `jumprelu export` (it imported this and ran nothing)
    from jumprelu.cli import main_of

    main_of("export")
