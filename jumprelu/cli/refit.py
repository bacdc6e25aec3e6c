"""jumprelu refit --workdir RUN [--member i] [--rows N] [--ridge R] [--noprefixes]

A least-squares decoder for a trained SAE's own codes (`jumprelu/train/refit.py`), fitted to the
last N rows of the run's training stream: rows training already read, so no new data. The
encoder, and so every code, L0 and firing frequency, is unchanged. Writes RUN/refit/params.npz
(Gemma Scope layout: `jumprelu.load` and the exporters read it) and RUN/refit/refit.json with the
held-out metrics before and after. One refit of a run at a time (RUN/refit/lock.json).

A Matryoshka run's refit minimises its weighted nested loss, so each prefix keeps a decoder of its
own; `--noprefixes` fits the whole width's error alone (on the shared SmolLM2 activations, 2M
tokens, L0 50: whole-SAE FVU 0.1297 → 0.1287 but its first 512 latents 0.269 → 0.287; nested,
0.1302 and 0.265).
"""

from __future__ import annotations

import json

from jumprelu.cli import common

CHUNK_ROWS = 4096


def refit_workdir(
    workdir: str, member: int | None, rows: int, ridge: float, store: str | None = None, prefixes: bool = True
) -> dict:
    """Fits, evaluates and writes the refit SAE of a training workdir; returns the report."""
    from jumprelu import fs
    from jumprelu.errors import UserError
    from jumprelu.export.load import load, require_workdir, resolve
    from jumprelu.train import lock
    from jumprelu.train.checkpoint import member_dir

    if rows <= 0:
        raise UserError(f"--rows must be > 0, found {rows}")
    workdir, member = resolve(workdir, member)  # a stacked member's WORKDIR/sae-i: the run's data, not its own
    sae = load(workdir, member=member)
    require_workdir(sae, workdir, "jumprelu refit")
    if sae.k is not None:
        raise UserError(f"{workdir}: a TopK SAE (k={sae.k}) has no JumpReLU form to refit (BatchTopK, ReLU, Gated do)")
    out_dir = fs.join(workdir if member is None else member_dir(workdir, member), "refit")
    # One refit of a run at a time: two would interleave their three files. Taken before the long work,
    # on RUN/refit only, so a refit of a checkpoint can run while training goes on.
    with lock.hold(out_dir, advice="wait for that refit to finish"):
        return _refit(sae, workdir, out_dir, rows, ridge, store, prefixes)


def _refit(sae, workdir: str, out_dir: str, rows: int, ridge: float, store: str | None, prefixes: bool) -> dict:
    import ml_collections

    from jumprelu import data as data_lib
    from jumprelu import fs
    from jumprelu.config import controller_rows
    from jumprelu.core.init import report_rows
    from jumprelu.errors import UserError
    from jumprelu.evaluate.metrics import MIN_ROWS, evaluate_rows, nested_prefixes, prefix_metrics
    from jumprelu.export import gemma_scope
    from jumprelu.train.refit import refit_decoder

    cfg = ml_collections.ConfigDict(sae.config)
    cfg.data.source = data_lib.run_source(sae.config, store, "jumprelu refit")  # the recorded absolute path
    if cfg.data.source == data_lib.LM_SOURCE:
        raise UserError(f"{workdir}: an on-the-fly run (data.source={data_lib.LM_SOURCE!r}) keeps no rows to refit on")
    store = data_lib.open_source(cfg.data, workdir)
    data_lib.check_same_store(sae.config, store, "jumprelu refit")  # the rows training read, not others
    stream = data_lib.make_stream(cfg.data, store)
    seen = sae.step * int(cfg.train.batch_size)
    if seen == 0:
        raise UserError(f"{workdir}: the checkpoint is at step 0; the refit uses rows training has read")
    start, count = seen - min(rows, seen), min(rows, seen)
    chunks = (stream.read(p, min(CHUNK_ROWS, start + count - p)) for p in range(start, start + count, CHUNK_ROWS))
    trained = nested_prefixes(cfg.sae)
    nested = trained if prefixes else ()  # a Matryoshka SAE's refit keeps its prefixes trained
    refit, used = refit_decoder(sae, chunks, ridge, nested)
    widths = [m for m, _ in trained[:-1]]  # the last is the whole SAE
    held_out = report_rows(stream.eval_set(), controller_rows(cfg))  # not the rows λ was set from
    metrics = {}
    for name, s in (("before", sae), ("after", refit)) if len(held_out) >= MIN_ROWS else ():
        m = evaluate_rows(s.params(), held_out)
        metrics[name] = {k: m[k] for k in ("l0", "fvu", "mse", "dead_fraction", "dense_fraction") if k in m}
        if widths:
            metrics[name]["prefixes"] = prefix_metrics(s.params(), widths, held_out)
    # Three files, each written atomically: an earlier refit's provenance and report go first, so a
    # kill between them never leaves this fit's params.npz beside another step's run file or report
    # (refit.json, written last, marks a complete refit).
    for stale in (fs.join(out_dir, "refit.json"), gemma_scope.run_file(fs.join(out_dir, "params.npz"))):
        fs.remove(stale)
    gemma_scope.export(refit, fs.join(out_dir, "params.npz"))
    run = dict(step=sae.step, scale=sae.scale, config=sae.config)  # the refit SAE's provenance on export
    fs.write_text_atomically(gemma_scope.run_file(fs.join(out_dir, "params.npz")), json.dumps(run, indent=2))
    report = dict(
        workdir=fs.abspath(workdir), step=sae.step, rows=used, stream_rows=[start, start + count], ridge=ridge,
        nested=bool(nested), held_out_rows=int(held_out.shape[0]), **metrics,
        params=fs.join(out_dir, "params.npz"),
    )  # fmt: skip
    fs.write_text_atomically(fs.join(out_dir, "refit.json"), json.dumps(report, indent=2))
    return report


def run(argv: list[str]) -> int:
    from absl import flags

    argv = common.underscore_flags(argv)
    workdir_flag = flags.DEFINE_string("workdir", None, "Training workdir of the SAE.")
    member_flag = flags.DEFINE_integer("member", None, "Which SAE of a stacked run.")
    rows_flag = flags.DEFINE_integer("rows", 131072, "How many of the last training rows to fit to.")
    ridge_flag = flags.DEFINE_float("ridge", 0.01, "Ridge ρ, relative to the mean squared code per latent.")
    store_flag = flags.DEFINE_string("store", None, "The run's store, where it moved to (default: where it trained).")
    prefixes_flag = flags.DEFINE_bool(
        "prefixes", True, "Fit a Matryoshka SAE's weighted nested loss; --noprefixes: the whole width's error alone."
    )
    flags.mark_flags_as_required(["workdir"])

    def main() -> int:
        from jumprelu.errors import UserError

        common.quiet_libraries(flags.FLAGS)
        try:
            report = refit_workdir(
                workdir_flag.value,
                member_flag.value,
                rows_flag.value,
                ridge_flag.value,
                store_flag.value,
                prefixes_flag.value,
            )
        except (UserError, FileNotFoundError, ValueError) as e:
            return common.fail(e)
        print(json.dumps(report, indent=2))
        if "after" not in report:  # data.eval_rows were all the L0 controller's (or 0)
            print(f"no held-out rows to measure the refit on; wrote {report['params']}")
        else:
            b, a, l0 = report["before"]["fvu"], report["after"]["fvu"], report["after"]["l0"]
            print(f"held-out FVU {b:.4f} -> {a:.4f} (L0 {l0:.2f} unchanged); wrote {report['params']}")
        return 0

    return common.absl_run(main, argv, "jumprelu refit")


if __name__ == "__main__":  # python -m jumprelu.cli.refit is `jumprelu refit` (it imported this and ran nothing)
    from jumprelu.cli import main_of

    main_of("refit")
