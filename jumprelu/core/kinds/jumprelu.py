"""JumpReLU SAE (Rajamanoharan et al., 2024): the paper's kind and the default.

  z = (x - b_dec) W_enc + b_enc;  f = z · H(z - θ);  x̂ = f W_dec + b_dec
  L = mean_b( ‖x_b - x̂_b‖² + λ Σ_i H(z_bi - θ_i) )   on the normalised scale x/C.
The L0 term goes through `ops.heaviside` on the pre-activations, so it trains θ only; there is
no L1 term, no auxiliary loss and no resampling. θ is trained as log θ (paper) or raw θ.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_dict

from jumprelu.core import layout, losses, ops
from jumprelu.core.kinds import Kind, KindSpec, common_module_args, jumprelu_arrays, register
from jumprelu.core.sae import SAEBase

THRESHOLD_PARAMS = ("log", "raw")


class JumpReLUSAE(SAEBase):
    bandwidth: float = 0.001
    threshold_init: float = 0.001
    threshold_param: str = "log"  # "log": train log θ (paper); "raw": train θ directly

    def setup(self):
        super().setup()
        if self.threshold_param == "log":
            init = math.log(self.threshold_init)
            self.log_threshold = self.param("log_threshold", nn.initializers.constant(init), (self.width,))
        elif self.threshold_param == "raw":
            self.raw_threshold = self.param("threshold", nn.initializers.constant(self.threshold_init), (self.width,))
        else:
            raise ValueError(f"sae.threshold_param must be one of {THRESHOLD_PARAMS}, got {self.threshold_param!r}")

    def threshold(self) -> jax.Array:
        """θ: [width], float32 whatever the compute dtype."""
        if self.threshold_param == "log":
            return jnp.exp(self.log_threshold)
        return self.raw_threshold

    def encode(self, x: jax.Array) -> jax.Array:
        """f = JumpReLU_θ(z). x: [..., d_model] -> f: [..., width]."""
        return ops.jumprelu(self.pre_activations(x), self.threshold(), self.bandwidth)

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        """What the loss needs. x: [B, d] -> z, f: [B, M]; l0: [B] (straight-through
        w.r.t. θ); fired_per_latent: [M] counts (metrics only); x_hat: [B, d]."""
        z = self.pre_activations(x)
        theta = self.threshold()
        f, l0 = ops.jumprelu_l0(z, theta, self.bandwidth)
        return {
            "z": z,
            "f": f,
            "l0": l0,
            "fired_per_latent": ops.fired_per_latent(z, theta),
            "x_hat": self.decode(f),
        }


def threshold_of(params: dict) -> jax.Array:
    """θ from a params dict of either parameterisation."""
    if "log_threshold" in params:
        return jnp.exp(params["log_threshold"])
    return params["threshold"]


def jumprelu_loss(model, params: dict, x: jax.Array, sparsity_coefficient) -> tuple[jax.Array, dict]:
    """x: [B, d_model] normalised activations. Returns (loss, metrics)."""
    out = model.apply({"params": params}, x)
    sq_err, metrics = losses.reconstruction(x, out)
    loss = jnp.mean(sq_err + sparsity_coefficient * out["l0"])  # l0 trains θ only
    return loss, dict(metrics, loss=loss)


_LOG_LAMBDA_MIN, _LOG_LAMBDA_MAX = math.log(1e-9), math.log(10.0)


def target_l0_stats(initial_lambda: float):
    """The controller's state for target-L0 mode: log λ, starting at `initial_lambda`."""
    return {"log_lambda": jnp.asarray(math.log(max(initial_lambda, 1e-9)), jnp.float32)}


def make_loss(target_l0: float | None = None, target_rate: float = 0.01, target_gain: float = 0.5):
    """The JumpReLU loss in the kinds' interface: (model, params, stats, x, λ) -> (loss, (metrics, stats)).

    With `target_l0` = T set, λ is no longer a fixed (warmed-up) constant but the output of a
    proportional-integral controller on e = log(batch L0 / T): log λ = I + gain · clip(e, ±1),
    and after each step I += rate · e (dual ascent on the constraint E[L0] = T, with a
    proportional term that reacts at once when L0 crosses T, damping the overshoot an integral
    alone leaves while θ catches up). λ grows while too many latents fire and shrinks while too
    few do. The loss itself stays the paper's squared error + λ·L0, so the gradients that reach
    θ have the size a fixed λ giving that L0 would produce, which Adam handles well. (A penalty
    on the L0 error itself gives θ gradients that shrink by orders of magnitude as L0 approaches
    T, and Adam's second-moment memory then freezes θ short of it.)
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
        sq_err, metrics = losses.reconstruction(x, out)
        total = jnp.mean(sq_err + lam * out["l0"])  # the paper's loss at the controller's λ
        new_integral = jnp.clip(integral + target_rate * error, _LOG_LAMBDA_MIN, _LOG_LAMBDA_MAX)
        metrics = dict(metrics, loss=total, sparsity_coefficient_adaptive=lam)
        return total, (metrics, {"log_lambda": jax.lax.stop_gradient(new_integral)})

    return loss


def export(params: dict, stats: dict) -> dict:
    return jumprelu_arrays(params, threshold_of(params))


def build(sae_cfg, d_model: int) -> Kind:
    model = JumpReLUSAE(
        **common_module_args(sae_cfg, d_model),
        bandwidth=sae_cfg.bandwidth,
        threshold_init=sae_cfg.threshold_init,
        threshold_param=sae_cfg.threshold_param,
    )
    target = sae_cfg.get("target_l0")
    loss = make_loss(target, sae_cfg.get("target_l0_rate", 0.01), sae_cfg.get("target_l0_gain", 0.5))
    if target is None:
        return Kind("jumprelu", model, loss, dict, export)
    lam0 = sae_cfg.sparsity_coefficient
    return Kind("jumprelu", model, loss, lambda: target_l0_stats(lam0), export)


def validate(s, check) -> None:
    check(s.bandwidth > 0, "sae.bandwidth", "> 0", s.bandwidth)
    check(s.threshold_init > 0, "sae.threshold_init", "> 0", s.threshold_init)
    check(s.threshold_param in THRESHOLD_PARAMS, "sae.threshold_param", "'log' or 'raw'", s.threshold_param)
    check(s.target_l0 is None or s.target_l0 > 0, "sae.target_l0", "> 0 or unset", s.target_l0)
    check(s.target_l0_rate > 0, "sae.target_l0_rate", "> 0", s.target_l0_rate)
    check(s.target_l0_gain >= 0, "sae.target_l0_gain", ">= 0", s.target_l0_gain)


SPEC = register(
    KindSpec(
        name="jumprelu",
        build=build,
        config_fields=lambda: dict(
            bandwidth=0.001,  # ε of the rectangle kernel, on the normalised scale
            threshold_init=0.001,
            threshold_param="log",  # "log" (paper) or "raw"
            # A requested mean L0; λ then adapts to reach it (make_loss): log λ = I + gain·clip(log(L0/target),
            # ±1), I starting at log sparsity_coefficient and moving by rate·log(L0/target) per step.
            target_l0=config_dict.placeholder(float),
            target_l0_rate=0.01,
            target_l0_gain=0.5,
        ),
        validate=validate,
        param_specs={
            "log_threshold": layout.THRESHOLD_SPEC,  # [M]
            "threshold": layout.THRESHOLD_SPEC,  # [M]
        },
        stackable=True,
    )
)
