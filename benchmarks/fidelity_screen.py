"""Many fidelity runs at once on one machine: a screen of recipe variants on a tuning split, then
the best variant on the reported split, so that the reported split never chooses anything.

  python benchmarks/fidelity_screen.py DATA --work DIR --results OUT.jsonl --tokens 8000000 \
      --target 100 --variant train.lr=5e-3 --variant "train.lr=5e-3 train.lr_decay_fraction=0.4"

Each run is one `benchmarks/fidelity.py` process with its own --out (the split of each seed is
made once and shared), at most --jobs at a time: one small SAE leaves an accelerator mostly
idle, so several processes share it. Order of work:
  1. on --tune_seed at --target: the recipe, every --variant, BatchTopK and its refit; then,
     needing no choice, the recipe and BatchTopK with its refit at --target on --report_seed and
     the recipe at each of --other_targets on --tune_seed;
  2. as soon as the recipe and every variant on --tune_seed are in: the variant with the lowest
     held-out FVU among those within ±10% of the target L0 with ≤ 5% dead and ≤ 1% above 10%,
     if it beats the recipe there, on --report_seed at --target and --other_targets and on
     --tune_seed at --other_targets.
Every finished row is appended once to --results with its seed and variant (a rerun reuses the
finished runs and adds only new rows); at --deadline seconds the runs still going are stopped
(and named in the output), so what finished is kept. A run that fails is named with its log at
the end and the screen exits 1; without a row of the recipe's there is no choice.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FIDELITY = os.path.join(HERE, "fidelity.py")
RECIPE = ""  # the variant with no overrides
SPLIT_FILES = ("train.npy", "eval.npy", "split.json", "store")


def shared_split(data: str, work: str, eval_rows: int, seed: int) -> str:
    """The split of `seed` under work/split_SEED, written once by fidelity.py's own split()."""
    sys.path.insert(0, HERE)
    from fidelity import split

    out = os.path.join(work, f"split_{seed}")
    os.makedirs(out, exist_ok=True)
    try:
        split(data, out, eval_rows, seed)
    except SystemExit as e:  # its advice names fidelity.py's --out; here that folder comes from --work
        raise SystemExit(str(e).replace("pass another --out", "pass another --work")) from None
    return out


def run_dir(work: str, seed: int, variant: str, target: int, tokens: int, kinds: str) -> str:
    """A run's own --out, holding absolute links to its seed's split (so fidelity.py reuses it);
    the budget names it, so a screen at another --tokens never reads this one's rows."""
    name = "_".join(variant.split()).replace("=", "-").replace("/", "_") or "recipe"
    out = os.path.join(work, f"s{seed}_t{target}_n{tokens}_{kinds.split(',')[0]}_{name}")
    os.makedirs(out, exist_ok=True)
    for f in SPLIT_FILES:
        link = os.path.join(out, f)
        if not os.path.lexists(link):
            os.symlink(os.path.join(work, f"split_{seed}", f), link)
    return out


class Job:
    def __init__(self, args, seed: int, variant: str, target: int, kinds: str = "jumprelu"):
        self.seed, self.variant, self.target, self.kinds, self.tokens = seed, variant, target, kinds, args.tokens
        self.out = run_dir(args.work, seed, variant, target, args.tokens, kinds)
        overrides = [a for o in variant.split() for a in ("--override", o)]
        self.command = [
            sys.executable, FIDELITY, args.data, "--out", self.out, "--eval_rows", str(args.eval_rows),
            "--seed", str(seed), "--tokens", str(args.tokens), "--targets", str(target), "--kinds", kinds,
            *overrides,
        ]  # fmt: skip
        self.process = None

    def start(self) -> None:
        self.log = open(os.path.join(self.out, "log.txt"), "w")
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        print(f"start: {shlex.join(self.command[1:])}", flush=True)

    def rows(self) -> list[dict]:
        """This job's rows, the newest per trainer (fidelity.py's results.jsonl keeps every run of
        its --out), each with its seed and variant."""
        path = os.path.join(self.out, "results.jsonl")
        newest = {}
        for line in open(path) if os.path.exists(path) else ():
            try:
                r = json.loads(line)
            except ValueError:  # torn by a kill: that trainer did not finish
                continue
            mine = r.get("trainer") in self.kinds.split(",") and r.get("target") == self.target
            if mine and r.get("tokens") == self.tokens:
                newest[r["trainer"]] = dict(r, seed=self.seed, variant=self.variant)
        return list(newest.values())

    def name(self) -> str:
        return f"seed {self.seed} target {self.target} {self.kinds} {self.variant or 'recipe'}"


def admissible(r: dict, target: int) -> bool:
    """The issue's bounds: L0 within ±10% of the target, ≤ 5% dead, ≤ 1% firing on > 10% of tokens."""
    return abs(r["l0"] - target) <= 0.1 * target and r["dead_fraction"] <= 0.05 and r["dense_fraction"] <= 0.01


def choose(finished: list[Job], args) -> tuple[str | None, str]:
    """(the screen's winner on the tuning split or None, what decided it): the lowest held-out FVU
    among the admissible rows, the recipe winning ties; no choice while the recipe's run has no row."""
    fvu, rows = {}, {}
    for job in finished:
        if job.seed == args.tune_seed and job.target == args.target and job.kinds == "jumprelu":
            for r in job.rows():
                rows[job.variant] = r
                if admissible(r, args.target):
                    fvu[job.variant] = r["fvu"]
    if RECIPE not in rows:
        return None, "none: the recipe's run left no row (see its log.txt)"
    if not fvu:
        return None, "none: no run, the recipe's included, is within the bounds"
    best = min(fvu, key=lambda v: (fvu[v], v != RECIPE))
    if best == RECIPE:
        return None, "the recipe (no variant beat it)"
    beaten = f"the recipe's {fvu[RECIPE]:.4f}" if RECIPE in fvu else "the recipe, outside the bounds"
    return best, f"{best} (FVU {fvu[best]:.4f} against {beaten})"


def row_key(r: dict) -> tuple:
    """Which run a row is of: a row with the same key is already in --results."""
    return r["seed"], r["variant"], r["trainer"], r["target"], r["tokens"], r.get("config_sha")


def record(rows: list[dict], path: str, seen: set) -> None:
    """Appends the rows not yet in --results (a rerun reuses finished runs: their rows once)."""
    with open(path, "a") as f:
        for r in rows:
            key = row_key(r)
            if key not in seen:
                seen.add(key)
                f.write(json.dumps(r) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data")
    p.add_argument("--work", required=True, help="folder for the splits and the runs")
    p.add_argument("--results", required=True, help="JSON lines: every finished row, with seed and variant")
    p.add_argument("--tokens", type=int, default=8_000_000)
    p.add_argument("--eval_rows", type=int, default=20_000, help="held-out rows of each split")
    p.add_argument("--target", type=int, default=100)
    p.add_argument("--other_targets", default="20,50")
    p.add_argument("--variant", action="append", default=[], help="space-separated FIELD=VALUE overrides")
    p.add_argument("--tune_seed", type=int, default=1)
    p.add_argument("--report_seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--deadline", type=float, default=0, help="seconds; 0: none")
    args = p.parse_args(argv)
    # checked before any split is written or any run starts
    if not os.path.isfile(args.data):
        p.error(f"{args.data}: no such file")
    if args.tune_seed == args.report_seed:
        p.error(f"--tune_seed and --report_seed must differ (no choice on the reported split): both {args.tune_seed}")
    for name in ("jobs", "eval_rows", "target"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, found {getattr(args, name)}")
    if args.tokens < 1024:  # fidelity.py's batch
        p.error(f"--tokens {args.tokens} is less than one batch of 1024: no training step")
    bad = [o for v in args.variant for o in v.split() if "=" not in o] + [v for v in args.variant if not v.split()]
    if bad:
        p.error(f"--variant: expected space-separated FIELD=VALUE overrides, found {bad[0]!r}")
    if len({" ".join(v.split()) for v in args.variant}) < len(args.variant):  # two jobs, one folder
        p.error(f"--variant: each variant once, found {args.variant}")
    try:
        others = [int(t) for t in args.other_targets.split(",") if t]
    except ValueError:
        p.error(f"--other_targets must be integers separated by commas, found {args.other_targets!r}")
    if any(t < 1 for t in others) or len(set(others)) < len(others) or args.target in others:
        p.error(f"--other_targets must be distinct L0s >= 1 other than --target {args.target}, found {others}")
    # the runs' links and commands must hold from their own folders
    args.work, args.data = os.path.abspath(args.work), os.path.abspath(args.data)
    seen = set()
    for line in open(args.results) if os.path.exists(args.results) else ():
        try:
            seen.add(row_key(json.loads(line)))
        except (ValueError, KeyError, TypeError):
            continue
    t0 = time.time()
    for seed in (args.tune_seed, args.report_seed):
        shared_split(args.data, args.work, args.eval_rows, seed)
    print(f"splits ready in {time.time() - t0:.0f} s", flush=True)

    screen = [Job(args, args.tune_seed, v, args.target) for v in [RECIPE, *args.variant]]
    queue = [
        screen[0],
        Job(args, args.tune_seed, RECIPE, args.target, "batchtopk,batchtopk_refit"),
        *screen[1:],
        Job(args, args.report_seed, RECIPE, args.target),
        Job(args, args.report_seed, RECIPE, args.target, "batchtopk,batchtopk_refit"),
        *[Job(args, args.tune_seed, RECIPE, t) for t in others],
    ]
    running, finished, failed, chosen = [], [], [], False
    while queue or running:
        for job in [j for j in running if j.process.poll() is not None]:
            running.remove(job)
            finished.append(job)
            job.log.close()
            rows = job.rows()
            if job.process.returncode:
                failed.append(job)
            got = "; ".join(f"{r['trainer']} L0 {r['l0']:.2f} FVU {r['fvu']:.4f}" for r in rows)
            print(f"done ({job.process.returncode}, {time.time() - t0:.0f} s): {job.name()}: {got}", flush=True)
            record(rows, args.results, seen)
        if not chosen and all(j in finished for j in screen):
            chosen = True
            best, why = choose(finished, args)
            print(f"screen's choice on seed {args.tune_seed}: {why}", flush=True)
            if best:
                queue[:0] = [Job(args, args.report_seed, best, t) for t in [args.target, *others]]
                queue += [Job(args, args.tune_seed, best, t) for t in others]
        if args.deadline and time.time() - t0 > args.deadline:
            for job in running:
                try:  # its whole session: fidelity.py and anything it started
                    os.killpg(job.process.pid, 9)
                except ProcessLookupError:
                    pass
                job.process.wait()
                job.log.close()
                record(job.rows(), args.results, seen)  # a refit job's training row may be in
                print(f"stopped at the deadline: {job.name()}", flush=True)
            for job in queue:
                print(f"not started: {job.name()}", flush=True)
            break
        while queue and len(running) < args.jobs:
            job = queue.pop(0)
            job.start()
            running.append(job)
        time.sleep(0.2)
    for job in failed:
        print(f"failed (exit {job.process.returncode}): {job.name()}; see {job.out}/log.txt", flush=True)
    command = shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"reproduce: python benchmarks/fidelity_screen.py {command}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
