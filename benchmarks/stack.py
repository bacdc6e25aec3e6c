"""Cost of K stacked SAEs (config `stack`) against one SAE's step, on the same batch; prints JSON.

  python benchmarks/stack.py --d-model 576 --width 4096 --batch 1024 --members 1,4,8

Builds the real compiled train program (program.build) for one SAE and for K stacked SAEs
(one λ each) and times a step of each. ratio_to_k_singles = t(K stacked) / (K · t(one)):
at most about 1 means stacking costs no more than K separate steps, while the batch is read
and sent to the device once instead of K times (not counted here: it only helps stacking).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from jumprelu.config import base_config
from jumprelu.train import program, sharding
from jumprelu.train import state as state_lib


def time_members(members: int, d_model: int, width: int, batch: int, repeats: int) -> float:
    cfg = base_config()
    cfg.sae.width = width
    cfg.train.batch_size = batch
    cfg.stack.sparsity_coefficients = tuple(1e-3 * (i + 1) for i in range(members)) if members > 1 else ()
    mesh = sharding.make_mesh(cfg.mesh)
    prog = program.build(cfg, d_model, mesh)
    state = state_lib.create_state(prog.model, prog.tx, mesh, jax.random.key(0), 1.0, members=prog.members)
    x = jax.device_put(jax.random.normal(jax.random.key(1), (batch, d_model)) / d_model**0.5, prog.batch_sharding)
    for _ in range(2):
        state, metrics = prog.step(state, x)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = prog.step(state, x)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=576)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--members", default="1,4,8", help="K values; 1 is the single-SAE baseline")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    ks = sorted({1, *(int(k) for k in args.members.split(","))})
    ms = {k: 1000 * time_members(k, args.d_model, args.width, args.batch, args.repeats) for k in ks}
    out = {
        "d_model": args.d_model,
        "width": args.width,
        "batch": args.batch,
        "ms_per_step": {str(k): round(v, 2) for k, v in ms.items()},
        "ratio_to_k_singles": {str(k): round(ms[k] / (k * ms[1]), 3) for k in ks if k > 1},
        "device": jax.devices()[0].platform,
        "command": "python " + " ".join(sys.argv),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    jnp.zeros(())  # start the backend before timing anything
    main()
