"""JumpReLU SAE (Rajamanoharan et al., 2024): the paper's kind and the default.

  z = (x - b_dec) W_enc + b_enc;  f = z · H(z - θ);  x̂ = f W_dec + b_dec
  L = mean_b( ‖x_b - x̂_b‖² ) + sparsity term          on the normalised scale x/C.
The paper's sparsity term is λ · mean_b Σ_i H(z_bi - θ_i) through `ops.jumprelu_l0`, which
trains θ only; there is no L1 term, no auxiliary loss and no resampling. That is the default;
every other recipe element is an option (see `jumprelu/core/sparsity.py`, `core/init.py`):
the sparsity loss (`step` | `quadratic` | `quadratic_rows` | `tanh`), a target L0 reached by a λ controller, a
frequency penalty, a pre-activation loss on dead latents, a bandwidth relative to the spread
of z, the straight-through terms passed to z too (`ste_pre_activations`), data-dependent init
of b_dec and θ, Matryoshka nested reconstructions, and a BatchTopK phase handing over to
per-latent θ (`batchtopk_fraction`). This module holds the Flax module and the kind's
registration; the loss with those options is `jumprelu_loss.py`, their config `jumprelu_options.py`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jumprelu.core import init as init_lib
from jumprelu.core import layout, losses, ops, sparse
from jumprelu.core.batch_threshold import batchtopk_threshold
from jumprelu.core.kinds import Kind, KindSpec, common_module_args, jumprelu_arrays, register
from jumprelu.core.kinds.jumprelu_loss import make_loss, threshold_of
from jumprelu.core.kinds.jumprelu_options import (
    THRESHOLD_PARAMS,
    Recipe,
    config_fields,
    init_stats,
    validate,
)
from jumprelu.core.kinds.jumprelu_step_plan import sparse_plan
from jumprelu.core.sae import SAEBase


class JumpReLUSAE(SAEBase):
    bandwidth: float = 0.001
    threshold_init: float = 0.001
    threshold_param: str = "log"  # "log": train log θ (paper); "raw": train θ directly
    ste_pre_activations: bool = False  # True: the θ straight-through terms train z too (Anthropic)

    def setup(self):
        super().setup()
        if not self.threshold_init > 0:  # log θ of 0 was "math domain error"; a raw θ ≤ 0 fires on noise
            raise ValueError(f"JumpReLUSAE: threshold_init must be > 0, found {self.threshold_init!r}")
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

    def __call__(self, x: jax.Array, bandwidth=None, batchtopk_k: int = 0, batchtopk_now=False) -> dict[str, jax.Array]:
        """What the loss needs. x: [B, d] -> z, f: [B, M]; l0: [B] (straight-through
        w.r.t. θ); fired_per_latent: [M] counts (metrics only); x_hat: [B, d].
        bandwidth: ε of this step when it is not the module's (relative bandwidth).
        batchtopk_k > 0 and batchtopk_now: the latents fire at this batch's BatchTopK threshold
        instead (the value with k·B entries of z above it, no gradient; returned as
        batchtopk_threshold) while θ trains in the shadow: l0 counts z > θ, and shadow_error
        [B] is ‖x - x̂_θ‖² of the SAE firing at θ, with a gradient for θ only."""
        z = self.pre_activations(x)
        theta = self.threshold()
        eps = self.bandwidth if bandwidth is None else bandwidth
        paper_op = ops.jumprelu_l0_ste_z if self.ste_pre_activations else ops.jumprelu_l0
        extra = {}
        if batchtopk_k:

            def phase():
                t = batchtopk_threshold(z, batchtopk_k)
                firing = jnp.broadcast_to(t, theta.shape)
                f = ops.jumprelu(z, firing, eps)
                f_theta, l0 = ops.jumprelu_l0(jax.lax.stop_gradient(z), theta, eps)
                frozen = jax.lax.stop_gradient((self.W_dec, self.b_dec))
                shadow_error = losses.squared_error(x, self.decode(f_theta, *frozen))
                return f, l0, firing, t, shadow_error

            def after():
                f, l0 = paper_op(z, theta, eps)
                return f, l0, theta, jnp.zeros((), jnp.float32), jnp.zeros(x.shape[:-1], jnp.float32)

            f, l0, firing, t, shadow_error = jax.lax.cond(batchtopk_now, phase, after)
            extra = {"batchtopk_threshold": t, "shadow_error": shadow_error}
        else:
            firing = theta
            f, l0 = paper_op(z, theta, eps)
        return {
            "z": z,
            "f": f,
            "l0": l0,
            "fired_per_latent": ops.fired_per_latent(z, firing),
            "x_hat": self.decode(f),
            **extra,
        }

    def sparse_outputs(self, x: jax.Array, capacity: int, bandwidth=None, z_variance: bool = False):
        """What the loss needs, from the sparse step (`core/sparse.py`): x_hat [B, d], l0 [B],
        counts and f_sum [M] (Σ_b H, Σ_b f, straight-through w.r.t. θ), fired_per_latent [M],
        overflow [] (1.0: this batch took the dense path), z_sum [M] (Σ_b z, differentiable) and,
        with z_variance, z_var [M] (variance of z over the batch, statistics only). No [B, M] array
        is returned."""
        eps = jnp.asarray(self.bandwidth if bandwidth is None else bandwidth, jnp.float32)
        bias = self.encoder_bias()
        theta = self.threshold()
        x_hat, l0, counts, f_sum, overflow = sparse.sparse_forward(
            x,
            self.W_enc,
            bias,
            theta,
            self.W_dec,
            self.b_dec,
            eps,
            sparse.Capacity.for_batch(capacity, x.shape[0], self.width),
            self.compute_dtype,
        )
        out = {
            "x_hat": x_hat,
            "l0": l0,
            "counts": counts,
            "f_sum": f_sum,
            "fired_per_latent": jax.lax.stop_gradient(counts),
            "overflow": overflow,
            "z_sum": jnp.sum(x, axis=0) @ self.W_enc + x.shape[0] * bias,
        }
        if z_variance:
            out["z_var"] = sparse.z_variance(x, self.W_enc)
        return out


def export(params: dict, stats: dict) -> dict:
    return jumprelu_arrays(params, threshold_of(params))


def build(sae_cfg, d_model: int, train_steps: int = 0) -> Kind:
    model = JumpReLUSAE(
        **common_module_args(sae_cfg, d_model),
        bandwidth=sae_cfg.bandwidth,
        threshold_init=sae_cfg.threshold_init,
        threshold_param=sae_cfg.threshold_param,
        ste_pre_activations=sae_cfg.ste_pre_activations,
    )
    recipe = Recipe.from_config(sae_cfg, train_steps)
    lam0, width = sae_cfg.sparsity_coefficient, sae_cfg.width
    stats = lambda: init_stats(recipe, width, lam0, d_model)  # noqa: E731
    return Kind("jumprelu", model, make_loss(recipe=recipe), stats, export, step_path=sparse_plan(sae_cfg)[1])


SPEC = register(
    KindSpec(
        name="jumprelu",
        build=build,
        config_fields=config_fields,
        validate=validate,
        param_specs={
            "log_threshold": layout.THRESHOLD_SPEC,  # [M]
            "threshold": layout.THRESHOLD_SPEC,  # [M]
            "tokens_since_fired": layout.THRESHOLD_SPEC,  # [M] stats, with the pre-activation loss
            "held_out_rows": layout.REPLICATED,  # [N, d_model] stats, with sae.target_l0_held_out_rows
        },
        stackable=True,
        needs_data=init_lib.needs_data,
        init_from_data=init_lib.start_from_data,
    )
)
