"""The paper's comparison: L0 against FVU for every SAE kind, on the same data, loop and budget.

  python benchmarks/pareto.py --data ../shared/data/smollm2_135m_l15_resid_dev.npy --out /tmp/pareto

Runs the sweep of an experiment file (default experiments/smollm2_pareto.py: λ for JumpReLU,
ReLU and Gated, k for TopK and BatchTopK, width 4,096, 512k tokens each), evaluates each SAE on
the held-out split, and writes to --out:
  pareto.csv   one row per run: kind, knob, value, held-out L0, FVU, dead/dense shares, seconds
  pareto.png   L0 (log axis) against FVU, one curve per kind
  pareto.json  the same plus FVU interpolated at L0 = 20, 50, 100 (log-L0 interpolation, never
               extrapolated: "—" where a kind's curve does not reach that L0)
Every SAE is measured on the same held-out rows (those a target-L0 controller reads left out of
every kind's). Finished runs are kept in OUT/runs/ (named by their config's hash too) and not
trained again, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import config_hash, ensure_store, train_run  # noqa: E402
from jumprelu.config import controller_rows, validate  # noqa: E402
from jumprelu.core.init import report_rows  # noqa: E402
from jumprelu.errors import ConfigError, Diverged  # noqa: E402
from jumprelu.evaluate import pareto, plots  # noqa: E402
from jumprelu.launch import experiment  # noqa: E402

FIELDS = ("kind", "knob", "value", "l0", "fvu", "mse", "dead_fraction", "dense_fraction", "tokens", "seconds", "run")


def held_out_rows(cfg):
    """The store's held-out split as the runs see it (the same data.eval_rows and seed)."""
    from jumprelu import data as data_lib

    return data_lib.make_stream(cfg.data, data_lib.open_source(cfg.data, "")).eval_set()


def evaluate(workdir: str, rows) -> dict:
    import jumprelu
    from jumprelu.evaluate.metrics import evaluate_rows

    sae = jumprelu.load(workdir)
    return evaluate_rows(dict(sae.params(), k=sae.k), rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="activation store directory, or a .npy [N, d_model]")
    p.add_argument("--out", required=True, help="output directory (runs, CSV, PNG, JSON)")
    p.add_argument("--experiment", default="smollm2_pareto", help="experiment file or name, with optional :arg")
    p.add_argument("--kinds", default="", help="comma-separated subset of kinds (default: all in the sweep)")
    p.add_argument("--width", type=int, default=None, help="override sae.width")
    p.add_argument("--steps", type=int, default=None, help="override train.steps (token budget = steps × batch)")
    p.add_argument("--targets", default="20,50,100", help="L0 values at which to interpolate FVU")
    args = p.parse_args()
    # checked before anything is written or trained (found by an audit: --targets was read after every
    # run had trained, a bad --width failed at the third run, --steps 0 was the default budget)
    try:
        targets = [float(t) for t in args.targets.split(",")]
    except ValueError:
        p.error(f"--targets must be numbers separated by commas, found {args.targets!r}")
    for name in ("width", "steps"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name} must be > 0, found {getattr(args, name)}")
    args.out = os.path.abspath(args.out)  # the store path enters each run's config hash: one spelling

    name, arg = experiment.split(args.experiment)
    runs = every_run = experiment.expand(experiment.load(name), arg)
    wanted = set(filter(None, args.kinds.split(",")))
    if wanted:
        runs = [r for r in runs if r.config.sae.kind in wanted]
    if not runs:  # before anything is written: earlier results stay
        p.error(f"--kinds {args.kinds}: no run of {args.experiment} has that kind")
    extra = {"log.progress": False}
    if args.width:
        extra["sae.width"] = args.width
    if args.steps:
        extra["train.steps"] = args.steps
    for run in runs:
        try:
            validate(experiment.apply_overrides(run.config, extra))
        except ConfigError as e:
            p.error(f"run {run.name} with --width {args.width} --steps {args.steps}: {e}")
    os.makedirs(args.out, exist_ok=True)
    extra["data.source"] = ensure_store(args.data, args.out)
    configs = [experiment.apply_overrides(run.config, extra) for run in runs]
    # every kind on the same held-out rows: all but those a target-L0 controller of the sweep reads
    # (of the whole sweep, so that --kinds picks the same rows)
    skip = max(controller_rows(experiment.apply_overrides(r.config, extra)) for r in every_run)
    held_out = report_rows(held_out_rows(configs[0]), skip)
    points, diverged, t0 = [], [], time.perf_counter()
    for i, (run, cfg) in enumerate(zip(runs, configs, strict=True)):
        knob, value = next(((k, v) for k, v in run.overrides.items() if k != "sae.kind"), ("", ""))
        workdir = f"{run.workdir(os.path.join(args.out, 'runs'))}_{config_hash(cfg)}"  # other settings: another run
        try:
            report = train_run(cfg, workdir)
        except Diverged as error:  # a blown-up run is no point of the curve; the others still are
            print(f"[{i + 1}/{len(runs)}] {run.name}: left out, {error}", flush=True)
            diverged.append({"run": run.name, "error": str(error)})
            continue
        e = evaluate(workdir, held_out)
        point = dict(kind=cfg.sae.kind, knob=knob, value=value, tokens=report["tokens"], run=run.name)
        point.update({k: e[k] for k in ("l0", "fvu", "mse", "dead_fraction", "dense_fraction")})
        point["seconds"] = None if report["seconds"] is None else round(report["seconds"], 1)
        points.append(point)
        print(
            f"[{i + 1}/{len(runs)}] {run.name}: L0 {e['l0']:.1f}  FVU {e['fvu']:.4f}  ({point['seconds']} s)",
            flush=True,
        )

    with open(os.path.join(args.out, "pareto.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(points)
    width = runs[0].config.sae.width if not args.width else args.width
    tokens = points[0]["tokens"] if points else 0
    plots.plot_pareto(points, os.path.join(args.out, "pareto.png"), title=f"width {width}, {tokens:,} tokens per SAE")
    fvus = pareto.table(points, targets)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    summary = {
        "command": command,
        "store": os.path.abspath(extra["data.source"]),
        "width": width,
        "tokens_per_run": tokens,
        "wall_s": round(time.perf_counter() - t0, 1),
        "fvu_at_l0": {k: {f"{t:g}": v for t, v in row.items()} for k, row in fvus.items()},
        "points": points,
        "diverged": diverged,  # runs left out of the curve, with the guard's message
    }
    with open(os.path.join(args.out, "pareto.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(pareto.markdown_table(fvus))
    print(f"wrote {args.out}/pareto.csv, pareto.png, pareto.json   ({summary['wall_s']} s)")
    print(f"reproduce: {command}")


if __name__ == "__main__":
    main()
