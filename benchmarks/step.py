"""Times the jitted train step against the floor of its own dense matmuls; prints JSON.

  python benchmarks/step.py --d-model 768 --width 16384 --batch 4096

The floor is the five products a step cannot avoid, timed in the same run at the same
shapes: forward z = x W_enc and x̂ = f W_dec; backward ∂W_dec = fᵀ g, ∂f = g W_decᵀ and
∂W_enc = xᵀ ∂z (no ∂x: the input needs no gradient). ratio = step / floor; 1.0 would
mean the nonlinearity, loss, Adam and the decoder projection cost nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jumprelu.config import base_config
from jumprelu.core import kinds
from jumprelu.train import optim
from jumprelu.train.state import init_state
from jumprelu.train.step import make_train_step


def _time(fn, args, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


def time_step(d_model: int, width: int, batch: int, repeats: int, warmup: int, dtype: str) -> list[float]:
    cfg = base_config()
    cfg.sae.update(width=width, compute_dtype=dtype)
    kind = kinds.from_config(cfg.sae, d_model)
    model = kind.model  # the JumpReLU kind; make_train_step's default loss
    tx = optim.make_optimizer(cfg.train)
    step_fn = jax.jit(
        make_train_step(
            model, tx, optim.sparsity_schedule(cfg.train, 1e-3), optim.learning_rate_schedule(cfg.train), kind.loss
        ),
        donate_argnums=0,
    )
    state = jax.jit(lambda k: init_state(model, tx, k, 1.0))(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (batch, d_model), jnp.float32) / np.sqrt(d_model)
    holder = [state]

    def run(x_):  # threads the donated state through repeated calls
        holder[0], metrics = step_fn(holder[0], x_)
        return metrics["loss"]

    return _time(run, (x,), repeats, warmup)


def time_floor(d_model: int, width: int, batch: int, repeats: int, warmup: int, dtype: str) -> list[float]:
    dt = jnp.dtype(dtype)
    ks = jax.random.split(jax.random.key(2), 6)
    x = jax.random.normal(ks[0], (batch, d_model), dt)
    w_enc = jax.random.normal(ks[1], (d_model, width), dt)
    w_dec = jax.random.normal(ks[2], (width, d_model), dt)
    f = jax.random.normal(ks[3], (batch, width), dt)
    g = jax.random.normal(ks[4], (batch, d_model), dt)
    gz = jax.random.normal(ks[5], (batch, width), dt)

    @jax.jit
    def floor(x, w_enc, w_dec, f, g, gz):
        f32 = jnp.float32
        return (
            jnp.matmul(x, w_enc, preferred_element_type=f32),  # z
            jnp.matmul(f, w_dec, preferred_element_type=f32),  # x̂
            jnp.matmul(f.T, g, preferred_element_type=f32),  # ∂W_dec
            jnp.matmul(g, w_dec.T, preferred_element_type=f32),  # ∂f
            jnp.matmul(x.T, gz, preferred_element_type=f32),  # ∂W_enc
        )

    return _time(floor, (x, w_enc, w_dec, f, g, gz), repeats, warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = p.parse_args()
    # Interleave step and floor timings so drifting machine load hits both alike.
    step_t, floor_t = [], []
    for _ in range(2):
        step_t += time_step(a.d_model, a.width, a.batch, a.repeats // 2 or 1, a.warmup, a.dtype)
        floor_t += time_floor(a.d_model, a.width, a.batch, a.repeats // 2 or 1, a.warmup, a.dtype)
    step_ms, floor_ms = 1e3 * statistics.median(step_t), 1e3 * statistics.median(floor_t)
    flops = 10 * a.batch * a.d_model * a.width  # the five products, 2·B·d·M each
    print(
        json.dumps(
            {
                "d_model": a.d_model,
                "width": a.width,
                "batch": a.batch,
                "dtype": a.dtype,
                "ms_per_step": round(step_ms, 2),
                "matmul_floor_ms": round(floor_ms, 2),
                "ratio": round(step_ms / floor_ms, 3),
                "tokens_per_s": round(a.batch / (step_ms / 1e3)),
                "matmul_gflop_per_step": round(flops / 1e9, 2),
                "achieved_gflops": round(flops / (step_ms / 1e3) / 1e9, 1),
                "ratio_of_minimums": round(min(step_t) / min(floor_t), 3),  # less sensitive to machine noise
                "step_ms_min_max": [round(1e3 * min(step_t), 2), round(1e3 * max(step_t), 2)],
                "floor_ms_min_max": [round(1e3 * min(floor_t), 2), round(1e3 * max(floor_t), 2)],
                "device": str(jax.devices()[0].device_kind),
                "num_devices": jax.device_count(),
                "command": f"python benchmarks/step.py --d-model {a.d_model} --width {a.width} --batch {a.batch}",
            }
        )
    )


if __name__ == "__main__":
    main()
