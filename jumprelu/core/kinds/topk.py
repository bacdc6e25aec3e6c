"""TopK (Gao et al., 2024) and BatchTopK (Bussmann et al., 2024) SAEs, with the AuxK loss.

TopK keeps the k largest pre-activations of each token (then ReLU); BatchTopK keeps the
k·B largest of the whole batch, so tokens get a varying number of latents with mean ≤ k.
  L = ‖x - x̂‖² + α ‖e - ê‖²,   e = x - x̂ (no gradient),  ê = (top-k_aux of the dead
  latents' pre-activations, ReLU) W_dec
A latent is dead once it has not fired for `dead_window` tokens; the AuxK term is zero
while none is. Gao et al.'s defaults: k_aux = 512, α = 1/32, dead window 10M tokens.

Non-gradient state (`stats`): tokens since each latent last fired, and for BatchTopK an
exponential moving average of the smallest selected activation per batch. That average is
the global threshold with which a BatchTopK SAE becomes an exact JumpReLU SAE at inference.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jumprelu.core import backend as backends
from jumprelu.core import layout, losses
from jumprelu.core.kinds import Kind, KindSpec, common_module_args, jumprelu_arrays, register
from jumprelu.core.sae import SAEBase

_SINCE_FIRED_CAP = 2**30  # keeps the int32 counters from overflowing


@dataclasses.dataclass(frozen=True)
class AuxKConfig:
    k_aux: int = 512
    coefficient: float = 1 / 32
    dead_window: int = 10_000_000  # tokens
    threshold_decay: float = 0.999  # BatchTopK's threshold average


def _select_rows(z: jax.Array, k: int) -> jax.Array:
    """Mask of the k largest entries of each row of z [B, M]: exactly k per row (ties broken by index)."""
    _, idx = jax.lax.top_k(z, k)  # [B, k]
    rows = jnp.arange(z.shape[0])[:, None]
    return jnp.zeros(z.shape, jnp.bool_).at[rows, idx].set(True)


def _select_batch(z: jax.Array, k: int) -> jax.Array:
    """Mask of the k·B largest entries of the whole batch [B, M]: exactly k·B in all."""
    b, m = z.shape
    _, idx = jax.lax.top_k(z.reshape(-1), k * b)
    return jnp.zeros((b * m,), jnp.bool_).at[idx].set(True).reshape(b, m)


class TopKSAE(SAEBase):
    k: int = 32
    batch: bool = False  # True: BatchTopK
    sparse_decoder: bool = False  # decode from the k selected latents per row (sae.sparse=on)

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        z = self.pre_activations(x)
        if self.sparse_decoder:
            return self._sparse_outputs(z)
        selected = _select_batch(z, self.k) if self.batch else _select_rows(z, self.k)
        return self.outputs(z, jnp.where(selected, jax.nn.relu(z), 0.0), selected=selected)

    def _sparse_outputs(self, z: jax.Array) -> dict[str, jax.Array]:
        """The same outputs with x̂ = Σ_selected relu(z_bi) W_dec[i] + b_dec gathered from the
        selected entries (the same top-k, so the same ties), not a [B, M] x [M, d] product: autodiff
        then makes ∂W_dec a scatter-add and ∂f a sampled product over the B·k entries too. The
        encoder's backward stays dense (∂z scatters into [B, M])."""
        b, m = z.shape
        if self.batch:
            vals, flat = jax.lax.top_k(z.reshape(-1), self.k * b)
            rows, cols = flat // m, flat % m
        else:
            vals, cols = jax.lax.top_k(z, self.k)
            rows = jnp.broadcast_to(jnp.arange(b)[:, None], cols.shape).reshape(-1)
            vals, cols = vals.reshape(-1), cols.reshape(-1)
        dt = self.compute_dtype
        # Operands rounded to the matmul dtype, products in float32, as the dense decode's matmul.
        w_rows = self.W_dec.at[cols].get(mode="promise_in_bounds").astype(dt).astype(jnp.float32)  # [B·k, d]
        contrib = jax.nn.relu(vals).astype(dt).astype(jnp.float32)[:, None] * w_rows
        x_hat = jax.ops.segment_sum(contrib, rows, b, indices_are_sorted=not self.batch) + self.b_dec
        selected = jnp.zeros((b, m), jnp.bool_).at[rows, cols].set(True)
        fired = jax.lax.stop_gradient(jnp.where(selected, jax.nn.relu(z), 0.0)) > 0
        return {
            "z": z,
            "f": jnp.where(selected, jax.nn.relu(z), 0.0),
            "l0": jnp.sum(fired, axis=-1).astype(jnp.float32),
            "fired_per_latent": jnp.sum(fired, axis=0),
            "x_hat": x_hat,
            "selected": selected,
        }


def init_stats(width: int, batch: bool) -> dict:
    stats = {"tokens_since_fired": jnp.zeros((width,), jnp.int32)}
    if batch:
        stats["threshold_sum"] = jnp.zeros((), jnp.float32)
        stats["threshold_weight"] = jnp.zeros((), jnp.float32)
    return stats


def global_threshold(stats: dict) -> jax.Array:
    """BatchTopK's inference threshold: the bias-corrected moving average."""
    return stats["threshold_sum"] / jnp.maximum(stats["threshold_weight"], 1e-30)


def auxk_loss(z, x, x_hat, w_dec, dead, k_aux):
    """‖e - ê‖² per token with e = x - x̂ held fixed; ê from the dead latents' top k_aux."""
    e = jax.lax.stop_gradient(x - x_hat)
    k = min(k_aux, z.shape[-1])
    z_dead = jnp.where(dead, z, -jnp.inf)
    f_aux = jnp.where(_select_rows(z_dead, k) & dead, jax.nn.relu(z), 0.0)
    e_hat = f_aux @ w_dec
    return losses.squared_error(e, e_hat) * jnp.any(dead)


def make_loss(aux: AuxKConfig):
    def loss(model, params, stats, x, coefficient):
        del coefficient  # sparsity is fixed by k
        out = model.apply({"params": params}, x)
        sq_err, metrics = losses.reconstruction(x, out)
        since = stats["tokens_since_fired"]
        dead = since >= aux.dead_window
        aux_term = auxk_loss(out["z"], x, out["x_hat"], params["W_dec"], dead, aux.k_aux)
        total = jnp.mean(sq_err + aux.coefficient * aux_term)
        fired = out["fired_per_latent"] > 0
        new = {"tokens_since_fired": jnp.where(fired, 0, jnp.minimum(since + x.shape[0], _SINCE_FIRED_CAP))}
        if model.batch:
            smallest = jnp.min(jnp.where(out["selected"] & (out["f"] > 0), out["f"], jnp.inf))
            smallest = jax.lax.stop_gradient(jnp.where(jnp.isfinite(smallest), smallest, 0.0))
            d = aux.threshold_decay
            new["threshold_sum"] = d * stats["threshold_sum"] + (1 - d) * smallest
            new["threshold_weight"] = d * stats["threshold_weight"] + (1 - d)
        metrics = dict(metrics, loss=total, aux_loss=jnp.mean(aux_term), dead_fraction=jnp.mean(dead))
        return total, (metrics, new)

    return loss


# `auto` takes the sparse decoder where it was measured faster (benchmarks/step.py --kind, README
# "Step speed"): on XLA:CPU at 16K latents, batch 4,096, k 50 it took TopK's step from 3.23 to
# 2.64 s and BatchTopK's from 4.36 to 3.64 s (d_model 576), with twice the peak temporaries. On an
# NVIDIA H200 (2026-12-04) TopK's was 1.05× at that shape (11.8 → 11.3 ms), within the run's noise, so
# other backends keep the dense decoder. Its gathered rows are [B, k, d_model] where the
# dense decoder's arrays are [B, width], so auto also stays dense beyond the measured k·d_model of
# 1.76 × width (50 · 576 / 16,384). At 4K latents, batch 1,024 it was 1.04–1.11× at k 20 (with 2.4×
# the temporaries) and 0.72× / 0.51× at k 50 / 100, so the threshold stays at 16K.
_AUTO_MIN_WIDTH = 16384
_AUTO_MAX_GATHER_RATIO = 2.0


def decoder_plan(s, d_model: int) -> tuple[bool, str]:
    """(whether the step decodes from the k selected latents only; why) from `sae.*`.

    Deterministic: the same config on the same backend always gives the same plan."""
    mode = s.get("sparse", "auto")
    if mode != "auto":
        return mode == "on", f"sae.sparse={mode}"
    backend = backends.target()
    if backend != "cpu":
        measured = "TopK's measured no faster on gpu" if backend == "gpu" else f"not yet measured on {backend}"
        return False, f"auto: dense decoder (the sparse decoder: {measured})"
    if s.width < _AUTO_MIN_WIDTH:
        return False, f"auto: dense decoder (width {s.width} < {_AUTO_MIN_WIDTH}, where it was not measured faster)"
    if s.k * d_model > _AUTO_MAX_GATHER_RATIO * s.width:
        ratio = f"k·d_model = {s.k * d_model} > {_AUTO_MAX_GATHER_RATIO:g} × width"
        return False, f"auto: dense decoder ({ratio}: its gathered rows would outgrow the dense arrays)"
    return True, f"auto: sparse decoder (the {s.k} selected latents of each row)"


def _build(sae_cfg, d_model: int, train_steps: int = 0) -> Kind:
    batch = sae_cfg.kind == "batchtopk"
    aux = AuxKConfig(
        k_aux=sae_cfg.aux_k,
        coefficient=sae_cfg.aux_coefficient,
        dead_window=sae_cfg.dead_window_tokens,
        threshold_decay=sae_cfg.batchtopk_threshold_decay,
    )
    sparse_decoder, path = decoder_plan(sae_cfg, d_model)
    model = TopKSAE(**common_module_args(sae_cfg, d_model), k=sae_cfg.k, batch=batch, sparse_decoder=sparse_decoder)
    if batch:  # exactly a JumpReLU SAE with one learned global threshold
        export = lambda p, s: jumprelu_arrays(p, global_threshold(s) * jnp.ones_like(p["b_enc"]))  # noqa: E731
    else:  # ReLU'd pre-activations with θ = 0, plus the k no JumpReLU can express
        export = lambda p, s: dict(jumprelu_arrays(p, jnp.zeros_like(p["b_enc"])), k=sae_cfg.k)  # noqa: E731
    stats = lambda: init_stats(sae_cfg.width, batch)  # noqa: E731
    return Kind(sae_cfg.kind, model, make_loss(aux), stats, export, step_path=path)


def _validate(s, check) -> None:
    check(isinstance(s.k, int) and 0 < s.k <= s.width, "sae.k", f"an integer in [1, sae.width={s.width}]", s.k)
    check(s.aux_k > 0, "sae.aux_k", "> 0", s.aux_k)
    check(s.aux_coefficient >= 0, "sae.aux_coefficient", ">= 0", s.aux_coefficient)
    check(s.dead_window_tokens > 0, "sae.dead_window_tokens", "> 0", s.dead_window_tokens)
    check(
        0 <= s.batchtopk_threshold_decay < 1, "sae.batchtopk_threshold_decay", "in [0, 1)", s.batchtopk_threshold_decay
    )


def _fields() -> dict:  # Gao et al.'s AuxK defaults
    return dict(
        k=32,
        aux_k=512,
        aux_coefficient=1 / 32,
        dead_window_tokens=10_000_000,
        batchtopk_threshold_decay=0.999,
    )


_STATS_SPECS = {"tokens_since_fired": layout.THRESHOLD_SPEC}  # [M] dead-latent counters

TOPK = register(KindSpec("topk", _build, _fields, _validate, _STATS_SPECS))
BATCHTOPK = register(KindSpec("batchtopk", _build, _fields, _validate, _STATS_SPECS))
