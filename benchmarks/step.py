"""Times the jitted train step, dense and sparse, against the floor of its dense matmuls; prints JSON.

  python benchmarks/step.py --d-model 768 --width 16384 --batch 4096
  python benchmarks/step.py --data ../shared/data/smollm2_135m_l15_resid_dev.npy --width 16384 --batch 4096 --l0 50

The floor is the five products a dense step cannot avoid, timed in the same run at the same
shapes: forward z = x W_enc and x̂ = f W_dec; backward ∂W_dec = fᵀ g, ∂f = g W_decᵀ and
∂W_enc = xᵀ ∂z (no ∂x: the input needs no gradient). ratio = step / floor; 1.0 would
mean the nonlinearity, loss, Adam and the decoder projection cost nothing.

With --l0 N the step is the short recipe's JumpReLU step at target L0 N (the step after its
BatchTopK phase: the recipe with the phase switched off, the work a run's step does from the
hand-over on, without the counter and the switch the phase adds), and θ is set to the quantile of the
pre-activations of a batch (real rows with --data, normalised to E‖x‖² = 1) that makes the
batch's L0 N; the sparse step (core/sparse.py, sae.sparse=on) is timed beside the dense one,
interleaved. --sparse-only skips the dense step (for widths where it is slow). --phase also
times the step inside the recipe's BatchTopK phase (the first 80% of a run; always dense).

With --kind topk or batchtopk (and --l0 N as its k) the step is that kind's at k = N, and the
"sparse" step is its sparse decoder (sae.sparse=on: x̂ from the B·k selected latents); its
encoder backward stays dense, so its floor is the same five products.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jumprelu.config import base_config
from jumprelu.core import kinds
from jumprelu.core.kinds import jumprelu as jumprelu_kind
from jumprelu.core.kinds import topk as topk_kind
from jumprelu.recipes import apply_recipe
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


def _config(a, sparse: str, kind: str = "jumprelu", phase: bool = False):
    """The timed config from the command line `a` (its width, dtype, L0 and matmul precision, which
    the plans read). phase: keep the recipe's BatchTopK phase (dense only); otherwise the recipe's
    step after the hand-over, the one `sae.sparse` applies to."""
    width, dtype, l0 = a.width, a.dtype, a.l0
    cfg = base_config()
    cfg.sae.matmul_precision = a.matmul_precision
    if l0 and kind == "jumprelu":
        apply_recipe(cfg, "short", target_l0=l0)
        if not phase:
            cfg.sae.batchtopk_fraction = 0.0
    elif kind != "jumprelu":
        cfg.sae.update(kind=kind, k=int(l0))
    cfg.sae.update(width=width, compute_dtype=dtype, sparse=sparse)
    if l0:
        cfg.train.lr = 0.0  # the same work per step, and θ stays where the batch's L0 is l0
    return cfg


def _set_thresholds(state, model, x: jax.Array, l0: float):
    """θ (every latent) at the quantile of z over the batch that fires l0 latents per row."""
    z = model.apply({"params": state.params}, x, method=type(model).pre_activations)
    theta = float(jnp.quantile(z.reshape(-1), 1.0 - l0 / z.shape[-1]))
    params = dict(state.params)
    key = "threshold" if "threshold" in params else "log_threshold"
    value = theta if key == "threshold" else np.log(theta)
    params[key] = jnp.full_like(params[key], value)
    return state.replace(params=params)


# A run this long never leaves the BatchTopK phase while it is timed.
_PHASE_RUN_STEPS = 10**9


def make_step(cfg, d_model: int, x: jax.Array, l0: float | None):
    """(run(x) -> metrics, the sparse plan) for the config's step, state threaded through calls."""
    kind = kinds.from_config(cfg.sae, d_model, _PHASE_RUN_STEPS if cfg.sae.get("batchtopk_fraction") else 0)
    model = kind.model
    tx = optim.make_optimizer(cfg.train)
    step_fn = jax.jit(
        make_train_step(
            model, tx, optim.sparsity_schedule(cfg.train, 1e-3), optim.learning_rate_schedule(cfg.train), kind.loss
        ),
        donate_argnums=0,
    )
    state = jax.jit(lambda k: init_state(model, tx, k, 1.0, kind.init_stats))(jax.random.key(0))
    if l0 and cfg.sae.kind == "jumprelu":
        state = _set_thresholds(state, model, x, l0)
    holder = [state]

    def run(x_):  # threads the donated state through repeated calls
        holder[0], metrics = step_fn(holder[0], x_)
        return metrics

    return run, jumprelu_kind.sparse_plan(cfg.sae) if cfg.sae.kind == "jumprelu" else None


def time_step(run, x, repeats: int, warmup: int) -> list[float]:
    return _time(lambda x_: run(x_)["loss"], (x,), repeats, warmup)


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


def time_encoder_product(x: jax.Array, width: int, repeats: int, warmup: int, dtype: str) -> list[float]:
    """The one dense product the sparse step keeps, z = x W_enc, alone: its share bounds how far
    the sparse step can fall, and how its cost grows with the width."""
    dt = jnp.dtype(dtype)
    w_enc = jax.random.normal(jax.random.key(3), (x.shape[1], width), dt)
    product = jax.jit(lambda x_, w: jnp.matmul(x_.astype(dt), w, preferred_element_type=jnp.float32))
    return _time(product, (x, w_enc), repeats, warmup)


# Peak dense bf16 TFLOP/s per chip, from the vendors' spec sheets, for MFU (--peak-tflops overrides).
PEAK_TFLOPS = {"TPU v4": 275, "TPU v5 lite": 197, "TPU v5e": 197, "TPU v5p": 459, "TPU v6 lite": 918}
PEAK_TFLOPS.update({"NVIDIA A100": 312, "NVIDIA H100": 989, "NVIDIA H200": 989})


def _peak_tflops(device_kind: str) -> float | None:
    for name, peak in PEAK_TFLOPS.items():
        if device_kind.startswith(name):
            return peak
    return None


def _batch(a, d_model: int) -> jax.Array:
    if a.data:
        try:
            rows = np.load(a.data, mmap_mode="r")
        except (OSError, ValueError) as e:  # not an .npy (np.load's pickle refusal is a ValueError)
            raise SystemExit(f"--data {a.data}: not a readable .npy array ({e})") from None
        if rows.ndim != 2 or rows.shape[0] < a.batch:
            raise SystemExit(f"--data {a.data}: need a [rows >= {a.batch}, d] array, found {list(rows.shape)}")
        x = np.asarray(rows[: a.batch], np.float32)
        return jnp.asarray(x / np.sqrt(np.mean(np.sum(np.square(x), axis=-1))))
    return jax.random.normal(jax.random.key(1), (a.batch, d_model), jnp.float32) / np.sqrt(d_model)


def _peak_bytes(run_cfg, d_model: int, x) -> int | None:
    """Peak temporary bytes of the compiled step from XLA's memory analysis (None if unavailable)."""
    kind = kinds.from_config(run_cfg.sae, d_model)
    tx = optim.make_optimizer(run_cfg.train)
    lam, lr = optim.sparsity_schedule(run_cfg.train, 1e-3), optim.learning_rate_schedule(run_cfg.train)
    fn = make_train_step(kind.model, tx, lam, lr, kind.loss)
    state = jax.eval_shape(lambda k: init_state(kind.model, tx, k, 1.0, kind.init_stats), jax.random.key(0))
    mem = jax.jit(fn, donate_argnums=0).lower(state, x).compile().memory_analysis()
    return None if mem is None else int(mem.temp_size_in_bytes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256, help="ignored with --data (its width is used)")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--l0", type=float, default=None, help="target L0: sets θ and times the sparse step too")
    p.add_argument("--data", default=None, help="a [rows, d_model] .npy of real activations")
    p.add_argument("--sparse-only", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--kind", default="jumprelu", choices=["jumprelu", "topk", "batchtopk"], help="needs --l0 (k)")
    p.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (default: known chips)")
    p.add_argument("--phase", action="store_true", help="also time the recipe's BatchTopK-phase step (needs --l0)")
    p.add_argument(
        "--matmul-precision",
        default="default",
        choices=kinds.MATMUL_PRECISIONS,
        help="sae.matmul_precision: 'default' is the backend's (TF32 on NVIDIA GPUs), 'highest' float32",
    )
    a = p.parse_args()
    _check_args(a)
    # the steps, the floor and the encoder product alike
    with kinds.matmul_precision({"matmul_precision": a.matmul_precision}):
        print(json.dumps(_measure(a)))


def _check_args(a) -> None:
    """One line for each argument that would otherwise fail deep in the compile, or time nothing."""
    for flag, value, least in (("--width", a.width, 1), ("--batch", a.batch, 1), ("--d-model", a.d_model, 1),
                               ("--repeats", a.repeats, 1), ("--warmup", a.warmup, 0)):  # fmt: skip
        if value < least:
            raise SystemExit(f"{flag}: expected an integer >= {least}, found {value}")
    if a.l0 is not None and not 0 < a.l0 < a.width:
        raise SystemExit(f"--l0: expected a target in (0, --width={a.width}), found {a.l0}")
    if a.data and not os.path.isfile(a.data):
        raise SystemExit(f"--data {a.data}: no such file (expected a [rows, d_model] .npy)")
    if a.kind != "jumprelu" and not (a.l0 and a.l0 == int(a.l0)):
        raise SystemExit(f"--kind {a.kind}: give its k as a whole --l0, found {a.l0}")
    if a.phase and not (a.l0 and a.kind == "jumprelu"):
        raise SystemExit("--phase: the BatchTopK phase is the JumpReLU recipe's; give --l0 (and no --kind)")
    if a.sparse_only and not a.l0:
        raise SystemExit("--sparse-only: the sparse step needs --l0 (else no step is timed at all)")


def _measure(a) -> dict:
    x = _batch(a, a.d_model)
    d_model = x.shape[1]
    dense_cfg = _config(a, "off", a.kind)
    runs = {} if a.sparse_only else {"dense": make_step(dense_cfg, d_model, x, a.l0)[0]}
    plan = None
    if a.l0:
        sparse_cfg = _config(a, "on", a.kind)
        runs["sparse"], plan = make_step(sparse_cfg, d_model, x, a.l0)
    if a.phase:
        runs["phase"] = make_step(_config(a, "off", phase=True), d_model, x, a.l0)[0]
    # Interleave the steps and the floor so drifting machine load hits all alike.
    times = {name: [] for name in (*runs, "floor", "encoder")}
    for _ in range(2):
        for name, run in runs.items():
            times[name] += time_step(run, x, a.repeats // 2 or 1, a.warmup)
        times["floor"] += time_floor(d_model, a.width, a.batch, a.repeats // 2 or 1, a.warmup, a.dtype)
        times["encoder"] += time_encoder_product(x, a.width, a.repeats // 2 or 1, a.warmup, a.dtype)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    floor_ms = ms["floor"]
    flops = 10 * a.batch * d_model * a.width  # the five products, 2·B·d·M each
    out = {
        "d_model": d_model,
        "width": a.width,
        "batch": a.batch,
        "dtype": a.dtype,
        "kind": a.kind,
        "data": a.data or "gaussian",
        "matmul_floor_ms": round(floor_ms, 2),
        "encoder_product_ms": round(ms["encoder"], 2),  # z = x W_enc alone, one of the floor's five
        "matmul_gflop_per_step": round(flops / 1e9, 2),
    }
    for name in runs:
        out[f"{name}_ms_per_step"] = round(ms[name], 2)
        out[f"{name}_ratio_to_floor"] = round(ms[name] / floor_ms, 3)
        out[f"{name}_tokens_per_s"] = round(a.batch / (ms[name] / 1e3))
        out[f"{name}_ratio_of_minimums"] = round(min(times[name]) / min(times["floor"]), 3)
    if "dense" in runs:  # the keys earlier versions printed
        out.update(ms_per_step=out["dense_ms_per_step"], ratio=out["dense_ratio_to_floor"])
        out["achieved_gflops"] = round(flops / (ms["dense"] / 1e3) / 1e9, 1)
    if a.l0:
        metrics = jax.device_get(runs["sparse"](x))
        out["l0"] = round(float(metrics["l0"]), 2)
        if plan is None:  # TopK's decoder
            auto = _config(a, "auto", a.kind).sae
            out["auto_plan"] = topk_kind.decoder_plan(auto, d_model)[1]
        else:  # JumpReLU's sparse step
            out.update(
                sparse_capacity=plan[0],
                sparse_path_taken=bool(metrics["sparse_step"] == 1.0),
                auto_plan=jumprelu_kind.sparse_plan(_config(a, "auto").sae)[1],
                # what `auto` picks for the recipe as a run uses it, BatchTopK phase included
                recipe_auto_plan=jumprelu_kind.sparse_plan(_config(a, "auto", phase=True).sae)[1],
            )
        if "dense" in runs:
            out["sparse_speedup"] = round(ms["dense"] / ms["sparse"], 3)
        for name, cfg in (("dense", dense_cfg), ("sparse", sparse_cfg)):
            if name in runs:
                out[f"{name}_peak_temp_mib"] = round((_peak_bytes(cfg, d_model, x) or 0) / 2**20, 1)
    cmd = f"python benchmarks/step.py --width {a.width} --batch {a.batch}"
    cmd += f" --data {a.data}" if a.data else f" --d-model {a.d_model}"
    cmd += (f" --l0 {a.l0:g}" if a.l0 else "") + (" --sparse-only" if a.sparse_only else "")
    cmd += f" --dtype {a.dtype}" if a.dtype != "float32" else ""
    cmd += f" --kind {a.kind}" if a.kind != "jumprelu" else ""
    cmd += " --phase" if a.phase else ""
    cmd += f" --matmul-precision {a.matmul_precision}" if a.matmul_precision != "default" else ""
    kind = str(jax.devices()[0].device_kind)
    peak = a.peak_tflops or _peak_tflops(kind)
    if peak:  # model FLOPs utilisation: the five dense products per step over the devices' peak
        for name in runs:
            # the step runs on one device (the others of a simulated host are idle)
            out[f"{name}_mfu"] = round(flops / (ms[name] / 1e3) / (peak * 1e12), 4)
    out.update(device=kind, backend=jax.default_backend(), num_devices=jax.device_count(), command=cmd)
    out["matmul_precision"] = a.matmul_precision
    return out


if __name__ == "__main__":
    main()
