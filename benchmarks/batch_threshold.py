"""Times the BatchTopK phase's threshold (core/batch_threshold.py) against 32 fixed halvings; prints JSON.

  python benchmarks/batch_threshold.py --data ../shared/data/smollm2_135m_l15_resid_dev.npy --width 4096 --batch 1024

The pre-activations are z = x W for the first --batch rows of --data (normalised to E‖x‖² = 1)
and a random W [d, width] of unit-variance columns. Both are called in turns, 25 times each per k;
the medians are printed, with whether both give the same mask z > t.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jumprelu.core.batch_threshold import batchtopk_threshold


def thirty_two_halvings(z: jax.Array, k: int) -> jax.Array:
    """The threshold before the early stop: 32 halvings of [0, max z] whatever the counts."""
    n = k * z.shape[0]

    def halve(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        enough = jnp.sum(z > mid) >= n
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    return jax.lax.fori_loop(0, 32, halve, (jnp.zeros((), jnp.float32), jnp.maximum(jnp.max(z), 0.0)))[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a [rows, d_model] .npy of real activations")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--ks", default="20,50,100")
    p.add_argument("--calls", type=int, default=25)
    a = p.parse_args()
    rows = np.load(a.data, mmap_mode="r")
    if rows.ndim != 2 or rows.shape[0] < a.batch:
        raise SystemExit(f"--data {a.data}: need a [rows >= {a.batch}, d] array, found {list(rows.shape)}")
    x = jnp.asarray(np.asarray(rows[: a.batch], np.float32))
    x = x / jnp.sqrt(jnp.mean(jnp.sum(x**2, axis=-1)))
    w = jax.random.normal(jax.random.key(1), (x.shape[1], a.width)) / np.sqrt(x.shape[1])
    z = jax.block_until_ready(x @ w)
    out = {"batch": a.batch, "width": a.width, "d_model": x.shape[1]}
    for k in (int(v) for v in a.ks.split(",")):
        fns = {"early_stop": jax.jit(lambda z, k=k: batchtopk_threshold(z, k))}
        fns["halvings_32"] = jax.jit(lambda z, k=k: thirty_two_halvings(z, k))
        ts = {name: jax.block_until_ready(fn(z)) for name, fn in fns.items()}  # compiled, and the masks
        times = {name: [] for name in fns}
        for _ in range(a.calls):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(z))
                times[name].append(time.perf_counter() - t0)
        for name, t in times.items():
            out[f"k{k}_{name}_ms"] = round(1e3 * float(np.median(t)), 1)
        out[f"k{k}_same_mask"] = bool(jnp.all((z > ts["early_stop"]) == (z > ts["halvings_32"])))
    cmd = f"python benchmarks/batch_threshold.py --data {a.data} --width {a.width} --batch {a.batch}"
    cmd += (f" --ks {a.ks}" if a.ks != "20,50,100" else "") + (f" --calls {a.calls}" if a.calls != 25 else "")
    out["command"] = cmd
    print(json.dumps(out))


if __name__ == "__main__":
    main()
