"""Expands an experiment's sweep into runs; lists them, or runs them here.

  jumprelu sweep quickstart --dry_run                  # every run, overrides, workdir
  jumprelu sweep quickstart --local                    # run them, one after another
  jumprelu sweep smollm2_pareto:jumprelu --local --parallel 2 --root /tmp/pareto
  jumprelu sweep gemma2_9b_comparison:runlocal,layer=20 --local

EXPERIMENT is a path, a name in --experiments_dir, or a packaged example (jumprelu/experiments/),
optionally with `:arg` for its get_config
and get_sweep. Each run gets ROOT/<run name>, a name built from its overrides, so a rerun
finds it: finished runs (report.json present) are skipped, interrupted ones resume from
their last checkpoint. ROOT defaults to runs/<experiment>[_<arg>] and may be gs://.
At the end a table of every run's held-out metrics is printed and written to
ROOT/sweep_summary.csv (after the rows of other sweeps that share ROOT), with
ROOT/sweep_summary.png (L0 against FVU) when there is something to plot. On a multi-host
TPU slice every host runs the same command (see jumprelu tpu); each run then trains on the
whole slice.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from jumprelu import errors, fs
from jumprelu.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, PREFIX, ConfigError
from jumprelu.launch import experiment as experiments
from jumprelu.launch.sweep_summary import SUMMARY_CSV, config_changes, status, summary_rows, write_summary
from jumprelu.train.workdir import is_run_workdir


def default_root(experiment: str, arg: str | None) -> str:
    name = os.path.basename(experiment).removesuffix(".py")
    return "runs/" + name + (("_" + re.sub(r"[^\w=.+-]", "-", arg)) if arg else "")


def _value(v) -> str:
    return json.dumps(list(v)) if isinstance(v, tuple) else repr(v)


def dry_run(spec: str, runs: list[experiments.Run], root: str) -> str:
    lines = [f"{len(runs)} runs of {spec} under {root}"]
    for i, run in enumerate(runs):
        overrides = " ".join(f"{k}={_value(v)}" for k, v in run.overrides.items()) or "(base config)"
        lines.append(f"[{i}] {status(run.workdir(root), run.config):<12} {run.workdir(root)}\n      {overrides}")
    return "\n".join(lines)


def run_one(spec: str, name: str, root: str) -> int:
    """Trains the run called `name` of the sweep (in this process); the sweep driver's subprocess."""
    from absl import logging

    from jumprelu.errors import UserError
    from jumprelu.train import loop
    from jumprelu.train.report import format_report

    logging.set_verbosity(logging.WARNING)
    experiment, arg = experiments.split(spec)
    runs = {r.name: r for r in experiments.expand(experiments.load(experiment), arg)}
    run = runs[name]
    from jumprelu.train import preemption
    from jumprelu.train.preemption import Preempted

    try:
        if run.config.data.source == "lm":  # on-the-fly rows: the LM feeds the loop (harvest/onthefly.py)
            from jumprelu.harvest import onthefly

            report = onthefly.train(run.config, run.workdir(root))
        else:
            report = loop.train(run.config, run.workdir(root))
        preemption.ignore_from_now()  # finished: a signal from here on would make it exit 143
    except UserError as e:
        print(f"{PREFIX} run {name}: {e}", file=sys.stderr)
        return e.exit_status  # 3 for a diverged run
    except Preempted as e:
        print(f"jumprelu: run {name}: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    print(format_report(report))
    return 0


def run_local(spec: str, runs: list[experiments.Run], root: str, parallel: int) -> list[tuple[str, int | str]]:
    """Runs every unfinished run as its own process, `parallel` at a time; returns (name, outcome).

    SIGTERM to this driver is passed on to the running runs (each saves its step and exits 75) and
    no further run starts; so is SIGINT, except that Ctrl-C already reached the runs through the
    terminal's process group (a second one would stop them without saving), so it is not resent."""
    children: list[subprocess.Popen] = []
    stopping = threading.Event()
    lock = threading.Lock()

    def launch(run: experiments.Run):
        workdir = run.workdir(root)
        state = status(workdir, run.config)
        if state == "finished":
            print(f"skip    {run.name} (finished)", flush=True)
            return run.name, "skipped"
        if state == "other config":
            changes = config_changes(workdir, run.config)
            more = f" and {len(changes) - 2} more" if len(changes) > 2 else ""
            print(
                f"FAILED  {run.name}: {workdir} holds a run of another config ({'; '.join(changes[:2])}{more}); "
                "give this sweep another --root",
                flush=True,
            )
            return run.name, EXIT_USER_ERROR
        cmd = [sys.executable, "-m", "jumprelu", "sweep", spec, "--root", root, "--run_one", run.name]
        pipe = subprocess.PIPE if parallel > 1 else None  # keep each run's output together
        with lock:
            if stopping.is_set():
                return run.name, "not started"
            print(f"start   {run.name} -> {workdir}", flush=True)
            child = subprocess.Popen(cmd, stdout=pipe, stderr=pipe, text=True)
            children.append(child)
        stdout, stderr = child.communicate()
        if parallel > 1:
            sys.stdout.write(stdout)
            sys.stderr.write(stderr[-4000:] if child.returncode else "")
        word = {0: "done", EXIT_PREEMPTED: "stopped"}.get(child.returncode, "FAILED")
        print(f"{word:<7} {run.name} (exit {child.returncode})", flush=True)
        return run.name, child.returncode

    def stop(signum, frame):
        stopping.set()
        if signum == signal.SIGTERM:
            with lock:
                for child in children:
                    if child.poll() is None:
                        child.send_signal(signum)

    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
    try:
        with ThreadPoolExecutor(max_workers=max(parallel, 1)) as pool:
            return list(pool.map(launch, runs))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str]) -> int:
    p = errors.ArgumentParser(
        prog="jumprelu sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("experiment", help="EXPERIMENT[:arg]: a path, a name in --experiments_dir, or a packaged one")
    p.add_argument("--experiments_dir", default=None, help="where to look up experiment names first")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dry_run", action="store_true", help="list the runs, their overrides and workdirs")
    mode.add_argument("--local", action="store_true", help="train the runs here")
    mode.add_argument("--run_one", metavar="NAME", help=argparse.SUPPRESS)  # one run, in this process
    mode.add_argument("--summary", action="store_true", help="only print/write the summary of the runs so far")
    p.add_argument("--root", default=None, help="directory (or gs:// URL) holding one workdir per run")
    p.add_argument("--parallel", type=int, default=1, help="runs trained at the same time with --local")
    args = p.parse_args(argv)
    if args.parallel < 1:  # was read as 1
        p.error(f"--parallel must be >= 1 (runs trained at the same time), found {args.parallel}")
    experiment, arg = experiments.split(args.experiment)
    try:
        path = experiments.resolve(experiment, args.experiments_dir)
        runs = experiments.expand(experiments.load(path), arg)
        root = args.root or default_root(experiment, arg)
    except ConfigError as e:
        print(f"{PREFIX} {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    # Absolute, so the per-run processes find the same files wherever they start.
    root = fs.abspath(root)
    if not fs.is_remote(root) and os.path.exists(root) and not os.path.isdir(root):
        print(f"{PREFIX} --root {root} is a file; expected a directory for the runs' workdirs", file=sys.stderr)
        return EXIT_USER_ERROR
    if is_run_workdir(root):  # the summary (and with --local the runs' folders) would land among its files
        print(
            f"{PREFIX} --root {root} is a training run's workdir; a sweep's root holds one workdir per run "
            "(give the folder above it, or a new one)",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    if args.summary and not fs.exists(root):  # was made, with a summary of every run "new"
        print(f"{PREFIX} --root {root}: no such directory, so no run of this sweep to summarise", file=sys.stderr)
        return EXIT_USER_ERROR
    spec = os.path.abspath(path) + (f":{arg}" if arg is not None else "")
    if args.run_one:
        return run_one(spec, args.run_one, root)
    if args.dry_run:
        print(dry_run(args.experiment, runs, root))
        return 0
    outcomes = run_local(spec, runs, root, args.parallel) if args.local else []
    print(write_summary(summary_rows(runs, root), root))
    print(f"summary: {fs.join(root, SUMMARY_CSV)}")
    saved = sum(code == EXIT_PREEMPTED for _, code in outcomes)
    not_started = sum(code == "not started" for _, code in outcomes)
    if saved or not_started:
        print(
            f"jumprelu sweep: stopped by a signal ({saved} runs saved their step, {not_started} not started); "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return EXIT_PREEMPTED
    failed = [name for name, code in outcomes if code not in (0, "skipped")]
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
