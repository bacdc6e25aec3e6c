"""Expands an experiment's sweep into runs; lists them, or runs them here.

  python -m launch.sweep quickstart --dry-run                  # every run, overrides, workdir
  python -m launch.sweep quickstart --local                    # run them, one after another
  python -m launch.sweep smollm2_pareto:jumprelu --local --parallel 2 --root /tmp/pareto
  python -m launch.sweep gemma2_9b_comparison:runlocal,layer=20 --local

EXPERIMENT is a file in experiments/ (or a path), optionally with `:arg` for its get_config
and get_sweep. Each run gets ROOT/<run name>, a name built from its overrides, so a rerun
finds it: finished runs (report.json present) are skipped, interrupted ones resume from
their last checkpoint. ROOT defaults to runs/<experiment>[_<arg>] and may be gs://.
At the end a table of every run's held-out metrics is printed and written to
ROOT/sweep_summary.csv, with ROOT/sweep_summary.png (L0 against FVU) when there is
something to plot. On a multi-host TPU slice every host runs the same command (see
launch/tpu.py); each run then trains on the whole slice.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from jumprelu import fs, sweeps
from jumprelu.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `-m launch.sweep` imports from


def default_root(experiment: str, arg: str | None) -> str:
    name = sweeps.resolve(experiment).rsplit("/", 1)[-1].removesuffix(".py")
    return "runs/" + name + (("_" + re.sub(r"[^\w=.+-]", "-", arg)) if arg else "")


def status(workdir: str) -> str:
    if fs.exists(fs.join(workdir, "report.json")):
        return "finished"
    if fs.exists(fs.join(workdir, "checkpoints")):
        return "interrupted"  # resumes from its last checkpoint
    return "new"


def _value(v) -> str:
    return json.dumps(list(v)) if isinstance(v, tuple) else repr(v)


def dry_run(spec: str, runs: list[sweeps.Run], root: str) -> str:
    lines = [f"{len(runs)} runs of {spec} under {root}"]
    for i, run in enumerate(runs):
        overrides = " ".join(f"{k}={_value(v)}" for k, v in run.overrides.items()) or "(base config)"
        lines.append(f"[{i}] {status(run.workdir(root)):<11} {run.workdir(root)}\n      {overrides}")
    return "\n".join(lines)


def run_one(spec: str, name: str, root: str) -> int:
    """Trains the run called `name` of the sweep (in this process); the sweep driver's subprocess."""
    from absl import logging

    from jumprelu import train
    from jumprelu.data import DataError
    from jumprelu.report import format_report

    logging.set_verbosity(logging.WARNING)
    experiment, arg = sweeps.split(spec)
    runs = {r.name: r for r in sweeps.expand(sweeps.load(experiment), arg)}
    run = runs[name]
    try:
        report = train.train(run.config, run.workdir(root))
    except (ConfigError, DataError) as e:
        print(f"jumprelu: error in run {name}: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0


def run_local(spec: str, runs: list[sweeps.Run], root: str, parallel: int) -> list[tuple[str, int | str]]:
    """Runs every unfinished run as its own process, `parallel` at a time; returns (name, outcome)."""

    def launch(run: sweeps.Run):
        workdir = run.workdir(root)
        if status(workdir) == "finished":
            print(f"skip    {run.name} (finished)", flush=True)
            return run.name, "skipped"
        print(f"start   {run.name} -> {workdir}", flush=True)
        cmd = [sys.executable, "-m", "launch.sweep", spec, "--root", root, "--run-one", run.name]
        out = subprocess.run(cmd, capture_output=parallel > 1, text=True, cwd=REPO)
        if parallel > 1:  # keep each run's output together
            sys.stdout.write(out.stdout)
            sys.stderr.write(out.stderr[-4000:] if out.returncode else "")
        print(f"{'done' if out.returncode == 0 else 'FAILED':<7} {run.name} (exit {out.returncode})", flush=True)
        return run.name, out.returncode

    with ThreadPoolExecutor(max_workers=max(parallel, 1)) as pool:
        return list(pool.map(launch, runs))


def summary_rows(runs: list[sweeps.Run], root: str) -> list[dict]:
    """One row per trained SAE (a stacked run gives one per member) from the runs' report.json."""
    from jumprelu.checkpoint import member_item  # late: the dry run should not import orbax

    rows = []
    for run in runs:
        workdir = run.workdir(root)
        base = {"run": run.name, "kind": run.config.sae.kind, "status": status(workdir)}
        if base["status"] != "finished":
            rows.append(base)
            continue
        report = json.loads(fs.read_text(fs.join(workdir, "report.json")))
        stacked = "members" in report
        for member in report["members"] if stacked else [report]:
            e = member.get("eval") or {}
            row = dict(base, tokens=member["tokens"])
            if stacked:
                name = f"{run.name}/{member_item(member['member'])}"
                row.update(run=name, sparsity_coefficient=member["sparsity_coefficient"])
            row.update({k: e[k] for k in ("l0", "fvu", "dead_fraction", "dense_fraction") if k in e})
            rows.append(row)
    return rows


def write_summary(rows: list[dict], root: str) -> str:
    fields = ["run", "kind", "status", "tokens", "l0", "fvu", "dead_fraction", "dense_fraction"]
    fields += sorted({k for r in rows for k in r} - set(fields))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fields)
    w.writeheader()
    w.writerows(rows)
    fs.makedirs(root)
    fs.write_text_atomically(fs.join(root, "sweep_summary.csv"), buf.getvalue())
    points = [{"kind": r["kind"], "l0": r["l0"], "fvu": r["fvu"]} for r in rows if r.get("l0", 0) > 0 and "fvu" in r]
    if len(points) >= 2:
        from jumprelu.plots import plot_pareto

        png = io.BytesIO()
        plot_pareto(points, png, title=root)
        fs.write_bytes_atomically(fs.join(root, "sweep_summary.png"), png.getvalue())
    lines = [f"{'run':<60} {'status':<11} {'L0':>8} {'FVU':>8} {'dead':>6}"]
    for r in rows:
        l0 = f"{r['l0']:8.2f}" if "l0" in r else f"{'':8}"
        fvu = f"{r['fvu']:8.4f}" if "fvu" in r else f"{'':8}"
        dead = f"{100 * r['dead_fraction']:5.1f}%" if "dead_fraction" in r else ""
        lines.append(f"{r['run']:<60} {r['status']:<11} {l0} {fvu} {dead}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", help="EXPERIMENT[:arg], a name in experiments/ or a path")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dry-run", action="store_true", help="list the runs, their overrides and workdirs")
    mode.add_argument("--local", action="store_true", help="train the runs here")
    mode.add_argument("--run-one", metavar="NAME", help=argparse.SUPPRESS)  # one run, in this process
    mode.add_argument("--summary", action="store_true", help="only print/write the summary of the runs so far")
    p.add_argument("--root", default=None, help="directory (or gs:// URL) holding one workdir per run")
    p.add_argument("--parallel", type=int, default=1, help="runs trained at the same time with --local")
    args = p.parse_args(argv)
    experiment, arg = sweeps.split(args.experiment)
    try:
        runs = sweeps.expand(sweeps.load(experiment), arg)
        root = args.root or default_root(experiment, arg)
    except ConfigError as e:
        print(f"jumprelu: error: {e}", file=sys.stderr)
        return 2
    # Absolute, so the per-run processes (started in the repository) find the same files.
    root = fs.abspath(root)
    spec = os.path.abspath(sweeps.resolve(experiment)) + (f":{arg}" if arg is not None else "")
    if args.run_one:
        return run_one(spec, args.run_one, root)
    if args.dry_run:
        print(dry_run(args.experiment, runs, root))
        return 0
    outcomes = run_local(spec, runs, root, args.parallel) if args.local else []
    print(write_summary(summary_rows(runs, root), root))
    print(f"summary: {fs.join(root, 'sweep_summary.csv')}")
    failed = [name for name, code in outcomes if code not in (0, "skipped")]
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
