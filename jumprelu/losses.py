"""The JumpReLU loss: squared error summed over d_model plus λ·L0, batch mean.

L = mean_b( ‖x_b - x̂_b‖² + λ Σ_i H(z_bi - θ_i) )   on the normalised scale x/C.
Summing (not averaging) the error over d_model is what makes λ comparable with the
paper's values. The L0 term goes through `ops.step` on the pre-activations, so it
trains θ only; there is no L1 term, no auxiliary loss and no resampling.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def reconstruction_metrics(x: jax.Array, x_hat: jax.Array, fired: jax.Array) -> dict[str, jax.Array]:
    """Batch statistics shared by every SAE kind. x, x_hat: [B, d]; fired: [B, M] in {0,1}."""
    sq_err = jnp.sum(jnp.square(x - x_hat), axis=-1)  # [B]
    centred = x - jnp.mean(x, axis=0, keepdims=True)
    total_var = jnp.sum(jnp.square(centred))
    fired = jax.lax.stop_gradient(fired)
    return {
        "mse": jnp.mean(sq_err),
        "l0": jnp.mean(jnp.sum(fired, axis=-1)),
        "fvu": jnp.sum(sq_err) / jnp.maximum(total_var, 1e-30),
        "frac_fired": jnp.mean(jnp.max(fired, axis=0)),
    }


def jumprelu_loss(
    model: nn.Module, params: dict, x: jax.Array, sparsity_coefficient: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x: [B, d_model] normalised activations. Returns (loss, metrics)."""
    out = model.apply({"params": params}, x)
    sq_err = jnp.sum(jnp.square(x - out["x_hat"]), axis=-1)  # [B]
    l0 = jnp.sum(out["fired"], axis=-1)  # [B], differentiable w.r.t. θ only
    loss = jnp.mean(sq_err + sparsity_coefficient * l0)
    metrics = reconstruction_metrics(x, out["x_hat"], out["fired"])
    metrics["loss"] = loss
    return loss, metrics
