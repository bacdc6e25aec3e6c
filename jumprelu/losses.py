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


def reconstruction_metrics(
    x: jax.Array, x_hat: jax.Array, l0: jax.Array, fired_per_latent: jax.Array
) -> dict[str, jax.Array]:
    """Batch statistics shared by every SAE kind.

    x, x_hat: [B, d]; l0: [B] active latents per row; fired_per_latent: [M] counts.
    """
    x, x_hat, l0 = (jax.lax.stop_gradient(a) for a in (x, x_hat, l0))
    sq_err = jnp.sum(jnp.square(x - x_hat), axis=-1)  # [B]
    centred = x - jnp.mean(x, axis=0, keepdims=True)
    total_var = jnp.sum(jnp.square(centred))
    return {
        "mse": jnp.mean(sq_err),
        "l0": jnp.mean(l0),
        "fvu": jnp.sum(sq_err) / jnp.maximum(total_var, 1e-30),
        "frac_fired": jnp.mean((fired_per_latent > 0).astype(jnp.float32)),
    }


def jumprelu_loss(
    model: nn.Module, params: dict, x: jax.Array, sparsity_coefficient: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x: [B, d_model] normalised activations. Returns (loss, metrics)."""
    out = model.apply({"params": params}, x)
    sq_err = jnp.sum(jnp.square(x - out["x_hat"]), axis=-1)  # [B]
    loss = jnp.mean(sq_err + sparsity_coefficient * out["l0"])  # l0 trains θ only
    metrics = reconstruction_metrics(x, out["x_hat"], out["l0"], out["fired_per_latent"])
    metrics["loss"] = loss
    return loss, metrics


def make_jumprelu_loss(target_l0: float | None = None, target_coefficient: float = 1.0):
    """The JumpReLU loss in the kinds' interface: (model, params, stats, x, λ) -> (loss, (metrics, stats)).

    With `target_l0` set, λ·L0 is replaced by μ·(mean L0 / target - 1)²: a quadratic pull of
    the batch's mean L0 towards the target, through the same straight-through gradient on θ.
    It pushes θ up while L0 is above the target and down while below, so no λ needs tuning.
    """

    def loss(model, params, stats, x, sparsity_coefficient):
        if target_l0 is None:
            total, metrics = jumprelu_loss(model, params, x, sparsity_coefficient)
            return total, (metrics, stats)
        out = model.apply({"params": params}, x)
        sq_err = jnp.sum(jnp.square(x - out["x_hat"]), axis=-1)
        penalty = target_coefficient * jnp.square(jnp.mean(out["l0"]) / target_l0 - 1.0)
        total = jnp.mean(sq_err) + penalty
        metrics = reconstruction_metrics(x, out["x_hat"], out["l0"], out["fired_per_latent"])
        return total, (dict(metrics, loss=total, l0_penalty=penalty), stats)

    return loss
