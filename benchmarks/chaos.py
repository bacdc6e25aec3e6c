"""Chaos: kill -9 and SIGTERM at random moments of a training run and of a store conversion, rerun,
compare bitwise with an undisturbed run; prints the score.

  python benchmarks/chaos.py --n 20 --out /tmp/jumprelu_chaos

Training (`jumprelu train`, a tiny synthetic config on CPU): one undisturbed reference run,
then N runs each sent SIGKILL (even trials) or SIGTERM (odd trials) at a moment drawn
uniformly from the reference run's wall time, so signals land in start-up (imports, the
synthetic store being written, the lock, compilation), in the loop, during checkpoint saves
and in the report. Each is then rerun with the same command until it exits 0 (a SIGTERM
in the loop exits 75 after saving the step it reached), and passes if its SAE parameters,
the metrics after the last resume, and the held-out report equal the reference's bit for bit.

Store conversion (`jumprelu store convert`, 48 shards): the same with SIGKILL/SIGTERM at a
random moment of the reference conversion's wall time; passes if every shard file is
byte-identical and metadata.json equal (but for its creation time).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this process only loads the results
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_FLAGS = [
    "--config.data.synthetic.d_model=32",
    "--config.data.synthetic.num_features=48",
    "--config.data.synthetic.rows=8192",
    "--config.data.eval_rows=512",
    "--config.data.block_bytes=512",
    "--config.sae.width=64",
    "--config.sae.threshold_init=0.05",
    "--config.train.batch_size=128",
    "--config.train.steps=1000",
    "--config.train.lr_warmup_steps=10",
    "--config.train.sparsity_warmup_steps=50",
    "--config.ckpt.every_steps=200",
    "--config.log.every_steps=20",
    "--config.log.progress=False",
]
TIMING = ("tokens_per_s", "elapsed_s")
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def _train_cmd(workdir: str) -> list[str]:
    return [sys.executable, "-m", "jumprelu", "train", "--config", "quickstart", "--workdir", workdir, *TRAIN_FLAGS]


def _convert_cmd(npy: str, out: str) -> list[str]:
    return [sys.executable, "-m", "jumprelu", "store", "convert", npy, out, "--shard_rows=5000"]


def _run(cmd: list[str]) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"chaos: {' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r.returncode, time.perf_counter() - t0


def _disturb(cmd: list[str], at: float, sig: int) -> int:
    """Starts `cmd`, sends `sig` after `at` seconds (if it is still running), returns its exit status."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p.wait(timeout=at)
    except subprocess.TimeoutExpired:
        p.send_signal(sig)
    return p.wait(timeout=900)


def _until_done(cmd: list[str]) -> int:
    """Reruns `cmd` until it exits 0; returns how many reruns it took."""
    for attempt in range(1, 4):
        r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
        if r.returncode == 0:
            return attempt
    raise RuntimeError(f"{' '.join(cmd)} did not finish in 3 reruns:\n{r.stderr[-2000:]}")


def _train_result(workdir: str) -> dict:
    from absl import logging

    import jumprelu

    logging.set_verbosity(logging.ERROR)  # orbax's notes on read-only managers, once per load

    params = jumprelu.load(workdir).params()
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        metrics = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]
    with open(os.path.join(workdir, "report.json")) as f:
        report = json.load(f)
    return {"params": params, "metrics": metrics, "eval": report["eval"], "steps": report["steps"]}


def _same_training(a: dict, b: dict) -> bool:
    same_params = all(np.array_equal(a["params"][k], b["params"][k]) for k in a["params"])
    return same_params and a["metrics"] == b["metrics"] and a["eval"] == b["eval"] and a["steps"] == b["steps"]


def _store_result(path: str) -> dict:
    with open(os.path.join(path, "metadata.json")) as f:
        meta = json.load(f)
    meta.pop("created")
    files = sorted(f for f in os.listdir(path) if f.startswith("shard-"))
    return {"metadata": meta, "files": {f: open(os.path.join(path, f), "rb").read() for f in files}}


def _checkpoints(workdir: str) -> str:
    """What a killed run left: its complete checkpoint steps."""
    d = os.path.join(workdir, "checkpoints")
    steps = sorted(int(f) for f in os.listdir(d) if f.isdigit()) if os.path.isdir(d) else []
    return "checkpoints " + (",".join(map(str, steps)) if steps else "none")


def _shards(path: str) -> str:
    done = sum(f.startswith("shard-") for f in os.listdir(path)) if os.path.isdir(path) else 0
    return f"{done} shards" + (", complete" if os.path.exists(os.path.join(path, "metadata.json")) else "")


def _trials(name, n, rng, reference, wall, start, left, finish, result, same) -> dict:
    passed, outcomes = 0, []
    for i in range(n):
        sig = signal.SIGKILL if i % 2 == 0 else signal.SIGTERM
        at = rng.uniform(0, wall)
        status = start(i, at, sig)
        after = left(i)
        reruns = finish(i)
        ok = same(reference, result(i))
        passed += ok
        outcomes.append(
            {"signal": sig.name, "at_s": round(at, 2), "exit": status, "left": after, "reruns": reruns, "bitwise": ok}
        )
        print(f"  {name} {i + 1:>2}/{n}: {sig.name} at {at:5.2f} s -> exit {status:>4} ({after}), "
              f"{reruns} rerun(s), {'identical' if ok else 'DIFFERENT'}", flush=True)  # fmt: skip
    return {"passed": passed, "n": n, "reference_s": round(wall, 2), "trials": outcomes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="disturbed runs of each kind")
    ap.add_argument("--out", default="/tmp/jumprelu_chaos")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    rng = random.Random(args.seed)
    wd = lambda i: os.path.join(args.out, f"train_{i}")  # noqa: E731

    print(f"training: reference run ({TRAIN_FLAGS[8].split('=')[1]} steps)", flush=True)
    _, train_wall = _run(_train_cmd(wd("ref")))
    training = _trials(
        "train",
        args.n,
        rng,
        _train_result(wd("ref")),
        train_wall,
        lambda i, at, sig: _disturb(_train_cmd(wd(i)), at, sig),
        lambda i: _checkpoints(wd(i)),
        lambda i: _until_done(_train_cmd(wd(i))),
        lambda i: _train_result(wd(i)),
        _same_training,
    )

    npy = os.path.join(args.out, "acts.npy")
    np.save(npy, np.random.default_rng(0).standard_normal((240_000, 64)).astype(np.float32))
    st = lambda i: os.path.join(args.out, f"store_{i}")  # noqa: E731
    print("store conversion: reference run (240,000 x 64 rows, 48 shards)", flush=True)
    _, convert_wall = _run(_convert_cmd(npy, st("ref")))
    conversion = _trials(
        "convert",
        args.n,
        rng,
        _store_result(st("ref")),
        convert_wall,
        lambda i, at, sig: _disturb(_convert_cmd(npy, st(i)), at, sig),
        lambda i: _shards(st(i)),
        lambda i: _until_done(_convert_cmd(npy, st(i))),
        lambda i: _store_result(st(i)),
        lambda a, b: a == b,
    )
    result = {"training": training, "store_conversion": conversion}
    with open(os.path.join(args.out, "chaos.json"), "w") as f:
        json.dump(result, f, indent=1)
    for name, r in result.items():
        saved = sum(t["exit"] == 75 for t in r["trials"])
        print(
            f"{name}: {r['passed']}/{r['n']} bitwise identical to the undisturbed run "
            f"(reference {r['reference_s']} s; signals: {r['n'] - r['n'] // 2} SIGKILL, {r['n'] // 2} SIGTERM"
            + (f", {saved} SIGTERMs saved their step and exited 75" if name == "training" else "")
            + ")"
        )


if __name__ == "__main__":
    main()
