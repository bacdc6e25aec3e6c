"""The JumpReLU loss: squared error summed over d_model plus λ·L0, batch mean.

L = mean_b( ‖x_b - x̂_b‖² + λ Σ_i H(z_bi - θ_i) )   on the normalised scale x/C.
Summing (not averaging) the error over d_model is what makes λ comparable with the
paper's values. The L0 term goes through `ops.step` on the pre-activations, so it
trains θ only; there is no L1 term, no auxiliary loss and no resampling.
"""

from __future__ import annotations

import math

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


def make_jumprelu_loss(target_l0: float | None = None, target_rate: float = 0.01, target_gain: float = 0.5):
    """The JumpReLU loss in the kinds' interface: (model, params, stats, x, λ) -> (loss, (metrics, stats)).

    With `target_l0` = T set, λ is no longer a fixed (warmed-up) constant but the output of a
    proportional-integral controller on e = log(batch L0 / T): log λ = I + gain · clip(e, ±1),
    and after each step I += rate · e (dual ascent on the constraint E[L0] = T, with a
    proportional term that reacts at once when L0 crosses T, damping the overshoot an integral
    alone leaves while θ catches up). λ grows while too many latents fire and shrinks while too
    few do. The loss itself stays the paper's squared error + λ·L0, so
    the gradients that reach θ have the size a fixed λ giving that L0 would produce, which Adam
    handles well. (A penalty on the L0 error itself gives θ gradients that shrink by orders of
    magnitude as L0 approaches T, and Adam's second-moment memory then freezes θ short of it.)
    """

    def loss(model, params, stats, x, sparsity_coefficient):
        if target_l0 is None:
            total, metrics = jumprelu_loss(model, params, x, sparsity_coefficient)
            return total, (metrics, stats)
        integral = stats["log_lambda"]
        out = model.apply({"params": params}, x)
        # This batch's L0 (no gradient through it) sets this step's λ.
        error = jnp.log(jnp.maximum(jax.lax.stop_gradient(jnp.mean(out["l0"])), 1e-3) / target_l0)
        lam = jnp.exp(integral + target_gain * jnp.clip(error, -1.0, 1.0))
        sq_err = jnp.sum(jnp.square(x - out["x_hat"]), axis=-1)
        total = jnp.mean(sq_err + lam * out["l0"])  # the paper's loss at the controller's λ
        metrics = dict(reconstruction_metrics(x, out["x_hat"], out["l0"], out["fired_per_latent"]), loss=total)
        new_integral = jnp.clip(integral + target_rate * error, _LOG_LAMBDA_MIN, _LOG_LAMBDA_MAX)
        metrics = dict(metrics, sparsity_coefficient_adaptive=lam)
        return total, (metrics, {"log_lambda": jax.lax.stop_gradient(new_integral)})

    return loss


_LOG_LAMBDA_MIN, _LOG_LAMBDA_MAX = math.log(1e-9), math.log(10.0)


def target_l0_stats(initial_lambda: float):
    """The controller's state for target-L0 mode: log λ, starting at `initial_lambda`."""
    return {"log_lambda": jnp.asarray(math.log(max(initial_lambda, 1e-9)), jnp.float32)}
