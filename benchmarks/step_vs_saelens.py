"""SAELens's own JumpReLU training step and ours, timed in turns at the same shapes and L0; prints JSON.

  bash benchmarks/peers/setup.sh     # SAELens + CPU torch in benchmarks/peers/.venv (once)
  python benchmarks/step_vs_saelens.py --data ../shared/data/smollm2_135m_l15_resid_dev.npy \
      --width 16384 --batch 4096 --l0 50

Each round runs SAELens's `SAETrainer.step` (benchmarks/peers/saelens_step.py, in the peer
virtualenv; its θ set per latent so the batch L0 is --l0), then our dense and sparse steps
(benchmarks/step.py's setup: the short recipe at target --l0, θ set the same way), so drifting
machine load hits all of them alike. The ratios are SAELens ms / ours ms: above 1, ours is
faster. --saelens-env KEY=VALUE (repeatable) sets variables for the SAELens process only, e.g.
an allocator: --saelens-env LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2.
SAELens is never a dependency of the project.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import step as ours  # noqa: E402  (benchmarks/step.py)

PEER_PYTHON = os.path.join(HERE, "peers", ".venv", "bin", "python")


def saelens_round(a, d_model: int, env: dict) -> dict:
    cmd = [PEER_PYTHON, os.path.join(HERE, "peers", "saelens_step.py"), "--d-in", str(d_model)]
    cmd += ["--width", str(a.width), "--batch", str(a.batch), "--l0", str(a.l0), "--steps", str(a.steps)]
    cmd += ["--warmup", "1"] + (["--data", a.data] if a.data else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"SAELens step failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None)
    p.add_argument("--d-model", type=int, default=576, help="ignored with --data")
    p.add_argument("--width", type=int, default=16384)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--l0", type=float, default=50.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round, each side")
    p.add_argument("--saelens-env", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args()
    if not os.path.exists(PEER_PYTHON):
        raise SystemExit(f"{PEER_PYTHON} not found: run `bash benchmarks/peers/setup.sh` first")
    env = dict(kv.split("=", 1) for kv in a.saelens_env)
    bench = argparse.Namespace(batch=a.batch, data=a.data)
    x = ours._batch(bench, a.d_model)
    d_model = x.shape[1]
    timed = argparse.Namespace(width=a.width, dtype="float32", l0=a.l0, matmul_precision="default")
    runs = {
        mode: ours.make_step(ours._config(timed, s), d_model, x, a.l0)[0]
        for mode, s in (("dense", "off"), ("sparse", "on"))
    }
    saelens_ms, times, l0 = [], {name: [] for name in runs}, []
    for _ in range(a.rounds):
        result = saelens_round(a, d_model, env)
        saelens_ms.append(result["ms_per_step"])
        l0.append(result.get("l0_first"))
        for name, run in runs.items():
            times[name] += ours.time_step(run, x, a.steps, 1)
    s_ms = statistics.median(saelens_ms)
    out = {"d_model": d_model, "width": a.width, "batch": a.batch, "l0": a.l0, "saelens_ms_per_step": round(s_ms, 1)}
    for name, t in times.items():
        ms = 1e3 * statistics.median(t)
        out[f"ours_{name}_ms_per_step"] = round(ms, 1)
        out[f"speedup_{name}"] = round(s_ms / ms, 2)
    out["saelens_batch_l0"] = l0
    out["saelens_env"] = env
    out["command"] = " ".join(["python benchmarks/step_vs_saelens.py", *sys.argv[1:]])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
