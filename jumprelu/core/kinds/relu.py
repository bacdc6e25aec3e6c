"""ReLU SAE with an L1 penalty (the vanilla baseline).

f = ReLU(z);  L = mean_b( ‖x - x̂‖² + λ Σ_i f_i ‖W_dec,i‖ ).
The L1 term is weighted by decoder-row norms so that shrinking W_dec cannot cheat it;
under the shared unit-norm decoder constraint the weights are 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jumprelu.core import losses
from jumprelu.core.kinds import Kind, KindSpec, common_module_args, jumprelu_arrays, register
from jumprelu.core.sae import SAEBase


class ReLUSAE(SAEBase):
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        z = self.pre_activations(x)
        return self.outputs(z, jax.nn.relu(z))


def loss(model, params, stats, x, coefficient):
    out = model.apply({"params": params}, x)
    sq_err, metrics = losses.reconstruction(x, out)
    l1 = out["f"] @ jnp.linalg.norm(params["W_dec"], axis=-1)
    total = jnp.mean(sq_err + coefficient * l1)
    return total, (dict(metrics, loss=total, l1=jnp.mean(l1)), stats)


def export(params, stats):  # ReLU = JumpReLU with θ = 0
    return jumprelu_arrays(params, jnp.zeros_like(params["b_enc"]))


SPEC = register(
    KindSpec(
        name="relu",
        build=lambda sae_cfg, d_model, train_steps=0: Kind(
            "relu", ReLUSAE(**common_module_args(sae_cfg, d_model)), loss, dict, export
        ),
        stackable=True,
    )
)
