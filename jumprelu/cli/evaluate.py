"""jumprelu evaluate --workdir RUN [--member i] [--eval_rows N] [--lm HARVEST_CONFIG [--lm.field=value ...]]

Metrics of a trained SAE on its run's held-out stored activations (the same rows the training
report used) and, with --lm, delta LM loss with the SAE spliced into the language model at its
site. Writes RUN/eval.json and RUN/firing_frequency.png.

With --lm on several hosts (JUMPRELU_DISTRIBUTED=1 or --lm.mesh.distributed=True, run on every
host), the held-out sequences are split over the hosts and process 0 writes the one report.
"""

from __future__ import annotations

import io
import json
import os

from jumprelu.cli import common


def evaluate_workdir(
    workdir: str,
    member: int | None = None,
    eval_rows: int | None = None,
    lm_cfg=None,
    step: int | None = None,
    store: str | None = None,
    command: str = "jumprelu evaluate",
):
    """Stored-activation metrics of a trained SAE on its run's held-out split (same seed, same rows).

    step: that checkpoint's SAE (default: the latest).

    command: the command errors name (and whose --store they advise).

    lm_cfg: the harvest config `--lm` will splice the SAE into, checked first against the run's
    recorded model, site and layer.

    Returns (sae, {"stored": metrics}, firing frequencies [width]). A Matryoshka run's metrics also
    hold each nested prefix's own (`prefixes`: width, l0, fvu of its first latents alone).
    """
    import ml_collections

    from jumprelu import data as data_lib
    from jumprelu.config import controller_rows
    from jumprelu.core.init import report_rows
    from jumprelu.errors import UserError
    from jumprelu.evaluate.metrics import MIN_ROWS, evaluate_rows, nested_prefixes, prefix_metrics
    from jumprelu.export.load import load, require_workdir, resolve

    workdir, member = resolve(workdir, member)  # a stacked member's WORKDIR/sae-i: the run's data, not its own
    sae = load(workdir, step=step, member=member)
    require_workdir(sae, workdir, command)
    if lm_cfg is not None:
        from jumprelu.harvest.checks import check_model_files

        check_lm_site(sae.config, lm_cfg)
        check_model_files(lm_cfg)  # before the stored rows' evaluation, not after it and gemma's import
    cfg = ml_collections.ConfigDict(sae.config)
    cfg.data.source = data_lib.run_source(sae.config, store, command)  # the recorded absolute path
    trained_split = cfg.data.eval_rows
    if eval_rows is not None:
        # the held-out split is a prefix: rows past the run's own split were trained on
        if not MIN_ROWS <= eval_rows <= trained_split:  # one row's FVU is ~1e6 or more: it has no spread
            raise UserError(
                f"--eval_rows must be between {MIN_ROWS} and the run's data.eval_rows ({trained_split}): "
                f"rows beyond its held-out split were trained on; found {eval_rows}"
            )
        cfg.data.eval_rows = eval_rows
    if cfg.data.source == data_lib.LM_SOURCE:  # an on-the-fly run: its held-out rows, recomputed by the LM
        from jumprelu.harvest import onthefly

        rows = onthefly.held_out_rows(cfg.data)
    else:
        store = data_lib.open_source(cfg.data, workdir)
        data_lib.check_same_store(sae.config, store, command)  # its held-out rows, not others
        rows = data_lib.make_stream(cfg.data, store).eval_set()
    # not the rows the target-L0 controller read in training: λ was set from their L0
    rows = report_rows(rows, controller_rows(cfg), split_rows=trained_split)
    if len(rows) < MIN_ROWS:
        raise UserError(
            f"{workdir}: {len(rows)} held-out rows to evaluate on (FVU needs {MIN_ROWS}): data.eval_rows="
            f"{cfg.data.eval_rows} and the target-L0 controller read {controller_rows(cfg)} of them (a larger "
            "data.eval_rows in training leaves more)"
        )
    metrics = evaluate_rows(dict(sae.params(), k=sae.k), rows)
    freq = metrics.pop("firing_frequency")
    widths = [m for m, _ in nested_prefixes(cfg.sae)[:-1]]  # the last is the whole SAE
    if widths:
        metrics["prefixes"] = prefix_metrics(dict(sae.params(), k=sae.k), widths, rows)
    return sae, {"source": cfg.data.source, "stored": metrics}, freq


def check_lm_site(config: dict, lm_cfg) -> None:
    """--lm must name the model, site and layer the SAE's rows were harvested at, where the run
    recorded them: every residual layer has the same width, so a wrong layer would give a delta LM
    loss with no error. A multi-site harvest config (`sites`, `layers`) is narrowed to the SAE's
    own pair. Models compare by size, so a base model's SAE may be scored on its -it model."""
    from jumprelu.errors import UserError
    from jumprelu.export import hooks
    from jumprelu.harvest.checks import EMPTY_EVAL_TEXTS, check_eval_sizes

    # before the stored rows' evaluation and the LM's import: a training config's missing `eval` was an
    # AttributeError traceback after both, an empty eval.texts one line after both
    missing = [field for field in ("model", "eval") if field not in lm_cfg]
    if missing:
        raise UserError(
            f"--lm: not a harvest config (it has no {missing[0]!r} field); pass the harvest experiment of the "
            "SAE's store, e.g. --lm harvest/gemma2:layer=12"
        )
    check_eval_sizes(lm_cfg)
    trained = hooks.provenance(config)
    if trained["model"] != "synthetic":
        _check_site(trained, lm_cfg)
    if not lm_cfg.eval.get("texts"):
        raise UserError(EMPTY_EVAL_TEXTS)


def _check_site(trained: dict, lm_cfg) -> None:
    from jumprelu.errors import UserError
    from jumprelu.export import hooks
    from jumprelu.harvest.run import harvest_sites

    was_site, was_layer = hooks.canonical_site(trained["site"]) or trained["site"], trained["layer"]
    pairs = [(hooks.canonical_site(s) or s, int(layer)) for s, layer in harvest_sites(lm_cfg)]
    mismatch = None
    if hooks.model_family(trained["model"]) not in (None, hooks.model_family(lm_cfg.model)):
        mismatch = f"model is {lm_cfg.model!r}"
    elif was_site is not None and was_layer is not None and (was_site, int(was_layer)) not in pairs:
        mismatch = "site, layer are " + ", ".join(f"{s} {layer}" for s, layer in pairs)
    if mismatch:
        raise UserError(
            f"--lm {mismatch} but the SAE was trained on rows of model {trained['model']}, site {trained['site']}, "
            f"layer {trained['layer']}; pass the harvest config of its store"
        )
    if len(pairs) > 1:  # the store's multi-site harvest config: splice at the SAE's own site
        lm_cfg.site, lm_cfg.layer, lm_cfg.sites, lm_cfg.layers = trained["site"], int(was_layer), (), ()


def run(argv: list[str]) -> int:
    from absl import flags
    from ml_collections import config_flags

    try:
        argv = common.resolve_config_flags(common.underscore_flags(argv), flags=("lm",))
    except ValueError as e:
        return common.fail(e)
    common.define_experiments_dir_flag(__name__)
    workdir_flag = flags.DEFINE_string("workdir", None, "Training workdir of the SAE.")
    member_flag = flags.DEFINE_integer("member", None, "Which SAE of a stacked run.")
    rows_flag = flags.DEFINE_integer("eval_rows", None, "Held-out stored rows (default: the run's data.eval_rows).")
    store_flag = flags.DEFINE_string("store", None, "The run's store, where it moved to (default: where it trained).")
    lm_flag = config_flags.DEFINE_config_file("lm", None, "Harvest config of the language model: adds delta LM loss.")
    flags.mark_flags_as_required(["workdir"])

    def main() -> int:
        import numpy as np

        from jumprelu import fs
        from jumprelu.errors import UserError
        from jumprelu.evaluate.plots import plot_firing_histogram
        from jumprelu.export.load import resolve
        from jumprelu.train.checkpoint import member_dir

        common.quiet_libraries(flags.FLAGS)
        lead = True
        try:
            workdir, member = resolve(workdir_flag.value, member_flag.value)
            out_dir = workdir if member is None else member_dir(workdir, member)
            if lm_flag.value is not None:  # several hosts: started before anything touches a device
                from jumprelu.harvest.run import start_processes

                lead = start_processes(lm_flag.value)[0] == 0
            # eval.json goes here (process 0's): a folder it cannot write is said now, not after hours; a
            # path that is not a folder is named by the load below
            if lead and not fs.is_remote(out_dir) and os.path.isdir(out_dir):
                fs.check_writable(out_dir)
            sae, result, freq = evaluate_workdir(
                workdir, member, rows_flag.value, lm_flag.value, store=store_flag.value
            )
            if lm_flag.value is not None:
                from jumprelu.harvest import lm_eval  # imports gemma: only on this path

                result["lm"] = lm_eval.evaluate_lm(sae, lm_flag.value)
                freq = result["lm"].pop("firing_frequency")
        except (UserError, FileNotFoundError, ValueError) as e:
            return common.fail(e)
        except OSError as e:  # the write check: a forbidden or read-only folder, a full disk
            return _unwritable(e)
        if not lead:  # every process computed the same report; process 0 writes it
            print(f"process {jax_process_index()}: the report is written by process 0")
            return 0
        freq = np.asarray(freq)
        result.update(
            workdir=fs.abspath(out_dir),
            step=sae.step,
            dead_fraction=float(np.mean(freq == 0)),
            dense_fraction=float(np.mean(freq > 0.1)),
            frequencies_from="lm" if "lm" in result else "stored",
        )
        try:
            earlier = earlier_lm(out_dir, sae.step)
        except OSError as e:  # eval.json unreadable, or its earlier delta LM loss not kept: left as it is
            print(json.dumps(result, indent=2))  # the metrics are not lost
            return _unwritable(e)
        if "lm" not in result and earlier is not None:
            result["lm"] = earlier
            print(f"kept the delta LM loss of step {sae.step} from the earlier --lm evaluation")
        print(json.dumps(result, indent=2))  # first: a write that fails (a disk filled meanwhile) loses nothing
        png = io.BytesIO()
        plot_firing_histogram(freq, png, title=f"step {sae.step}, {result['frequencies_from']} eval")
        try:
            fs.write_bytes_atomically(fs.join(out_dir, "firing_frequency.png"), png.getvalue())
            fs.write_text_atomically(fs.join(out_dir, "eval.json"), json.dumps(result, indent=2))
        except OSError as e:
            return _unwritable(e)
        print(f"wrote {fs.join(out_dir, 'eval.json')} and firing_frequency.png")
        return 0

    return common.absl_run(main, argv, "jumprelu evaluate")


def _unwritable(error: OSError) -> int:
    """One line for a folder the report cannot be written to; any other OSError is a bug, shown whole."""
    code = common.environment_failure(error, "eval.json is written then")
    if code is None:
        raise error
    return code


def earlier_lm(out_dir: str, step: int) -> dict | None:
    """The delta LM loss section an earlier `--lm` evaluation of this same step wrote to
    eval.json, which an evaluation without --lm keeps (it can take hours to measure); an eval.json
    with one of another step (or none recorded) is first kept as eval_step<N>.json (eval_earlier.json)."""
    from jumprelu import fs

    file = fs.join(out_dir, "eval.json")
    if not fs.exists(file):
        return None
    text = fs.read_text(file)
    try:
        before = json.loads(text)
    except ValueError:
        return None
    if not isinstance(before, dict) or not isinstance(before.get("lm"), dict):
        return None
    if before.get("step") == step:
        return before["lm"]
    was = before.get("step")
    kept = fs.join(out_dir, f"eval_step{was}.json" if isinstance(was, int) else "eval_earlier.json")
    fs.write_text_atomically(kept, text)
    print(f"kept {file} of step {was} (with its delta LM loss) as {kept}")
    return None


def jax_process_index() -> int:
    import jax

    return jax.process_index()


if __name__ == "__main__":  # python -m jumprelu.cli.evaluate is `jumprelu evaluate` (it imported this and ran nothing)
    from jumprelu.cli import main_of

    main_of("evaluate")
