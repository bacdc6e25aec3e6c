"""Gated SAE (Rajamanoharan et al., 2024a), with weight sharing between gate and magnitude.

  π_gate = (x - b_dec) W_gate + b_gate          (W_gate, b_gate are W_enc, b_enc)
  f_mag  = ReLU((x - b_dec) W_mag + b_mag),     W_mag = W_gate ⊙ exp(r_mag)  (per latent)
  f      = 1[π_gate > 0] · f_mag
  L = ‖x - x̂(f)‖² + λ ‖ReLU(π_gate)‖₁ (decoder-norm weighted) + ‖x - x̂_frozen(ReLU(π_gate))‖²

The Heaviside passes no gradient: the gate path learns only from the L1 term and the
auxiliary reconstruction through a frozen (stop-gradient) decoder. A Gated SAE is exactly
a JumpReLU SAE with W_enc = W_mag, b_enc = b_mag and θ = max(0, b_mag - exp(r_mag) b_gate)
(see `to_jumprelu`), which is how it is exported and evaluated.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jumprelu.core import layout, losses
from jumprelu.core.kinds import Kind, KindSpec, common_module_args, register
from jumprelu.core.sae import SAEBase


class GatedSAE(SAEBase):
    def setup(self):
        super().setup()
        self.r_mag = self.param("r_mag", nn.initializers.zeros, (self.width,))
        self.b_mag = self.param("b_mag", nn.initializers.zeros, (self.width,))

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        pi_gate = self.pre_activations(x)
        # (x - b_dec) W_mag = exp(r_mag) · (π_gate - b_gate): no second matmul.
        z_mag = jnp.exp(self.r_mag) * (pi_gate - self.b_enc) + self.b_mag
        gate = pi_gate > 0
        f = jnp.where(gate, jax.nn.relu(z_mag), 0.0)
        # The auxiliary reconstruction from the gate path through a frozen decoder.
        frozen = jax.lax.stop_gradient(self.W_dec), jax.lax.stop_gradient(self.b_dec)
        return self.outputs(z_mag, f, pi_gate=pi_gate, x_hat_gate=self.decode(jax.nn.relu(pi_gate), *frozen))


def loss(model, params, stats, x, coefficient):
    out = model.apply({"params": params}, x)
    sq_err, metrics = losses.reconstruction(x, out)
    l1 = jax.nn.relu(out["pi_gate"]) @ jnp.linalg.norm(params["W_dec"], axis=-1)
    aux = losses.squared_error(x, out["x_hat_gate"])
    total = jnp.mean(sq_err + coefficient * l1 + aux)
    return total, (dict(metrics, loss=total, l1=jnp.mean(l1), aux_loss=jnp.mean(aux)), stats)


def to_jumprelu(params: dict) -> dict:
    """The equivalent JumpReLU parameters (normalised units): W_enc, b_enc, threshold, W_dec, b_dec."""
    scale = jnp.exp(params["r_mag"])
    return {
        "W_enc": params["W_enc"] * scale,
        "b_enc": params["b_mag"],
        "threshold": jnp.maximum(params["b_mag"] - scale * params["b_enc"], 0.0),
        "W_dec": params["W_dec"],
        "b_dec": params["b_dec"],
    }


SPEC = register(
    KindSpec(
        name="gated",
        build=lambda sae_cfg, d_model, train_steps=0: Kind(
            "gated", GatedSAE(**common_module_args(sae_cfg, d_model)), loss, dict, lambda p, s: to_jumprelu(p)
        ),
        param_specs={"r_mag": layout.THRESHOLD_SPEC, "b_mag": layout.THRESHOLD_SPEC},  # [M] each
        stackable=True,
    )
)
