"""What every SAE kind shares, as a Flax Linen module: W_enc, b_enc, W_dec, b_dec.

Why Linen: the SAE's parameters are a plain dict of five arrays, and everything
around them is functional -- the pure train step, `jax.eval_shape` for abstract
state, the one sharding table keyed by parameter name, orbax restore into an
abstract target, `vmap` over stacked SAEs -- all of which take a dict directly.
Gemma's model is Linen too, so splicing an SAE into it needs no bridge.

The module works on *normalised* inputs x/C (E‖x/C‖² = 1); the scale C lives in the
train state and is folded out for users by `jumprelu.core.folded`. Shapes (row vectors):
  x: [..., d_model]   z, f: [..., width]
  W_enc: [d_model, width]   b_enc: [width]   threshold: [width]
  W_dec: [width, d_model]   b_dec: [d_model]
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Below this a raw threshold is clipped after every update: θ must stay positive for
# JumpReLU to be a jump and not a leak of negative pre-activations.
MIN_RAW_THRESHOLD = 1e-6


def init_decoder(key: jax.Array, shape: tuple[int, int], dtype=jnp.float32) -> jax.Array:
    """He-uniform [width, d_model], then each row rescaled to unit norm (the paper's init)."""
    width, _ = shape
    bound = math.sqrt(6.0 / width)  # fan_in of x̂ = f W_dec is the width
    w = jax.random.uniform(key, shape, dtype or jnp.float32, -bound, bound)
    return w / jnp.linalg.norm(w, axis=-1, keepdims=True)


class SAEBase(nn.Module):
    """What every SAE kind shares: W_enc, b_enc, W_dec, b_dec, their init, encoder and decoder maps.

    Kinds (`jumprelu/core/kinds/`) add their own parameters and activation on top.
    """

    d_model: int
    width: int
    pre_encoder_bias: bool = True  # subtract b_dec before encoding (paper default)
    compute_dtype: Any = jnp.float32  # dtype of the matmuls; parameters stay float32
    encoder_init_scale: float = 1.0  # W_enc starts as this times W_decᵀ (paper: 1)

    def setup(self):
        # the config checks these; the module used on its own (README) said "ZeroDivisionError"
        for name in ("d_model", "width"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or value <= 0:  # numpy's integers too (a store's d_model)
                raise ValueError(f"{type(self).__name__}: {name} must be a positive integer, found {value!r}")
        # Every param gets an explicit shape and an init taking (key, shape, dtype=None): importing
        # gemma replaces nn.Module.param process-wide with a version that requires both.
        self.W_dec = self.param("W_dec", init_decoder, (self.width, self.d_model))
        # W_enc starts as W_decᵀ and is untied from then on. Linen calls an init fn only
        # during `init`, so closing over the fresh W_dec ties the two at init time only.
        self.W_enc = self.param(
            "W_enc",
            lambda _key, _shape, _dtype=None: self.encoder_init_scale * jnp.transpose(self.W_dec),
            (self.d_model, self.width),
        )
        self.b_enc = self.param("b_enc", nn.initializers.zeros, (self.width,))
        self.b_dec = self.param("b_dec", nn.initializers.zeros, (self.d_model,))

    def pre_activations(self, x: jax.Array, w_enc: jax.Array | None = None, b_enc: jax.Array | None = None):
        """z = (x - b_dec) W_enc + b_enc. x: [..., d_model] -> [..., width].

        Computed as x W_enc + (b_enc - b_dec W_enc): the same value, but the gradient
        of b_dec then sums ∂z over the batch before one mat-vec, instead of a sixth
        [B, M] x [M, d] product (and, sharded, an all-reduce of [d], not of [B, d]).
        """
        w_enc = self.W_enc if w_enc is None else w_enc
        dt = self.compute_dtype
        z = jnp.matmul(x.astype(dt), w_enc.astype(dt), preferred_element_type=jnp.float32)
        return z + self.encoder_bias(w_enc, b_enc)

    def encoder_bias(self, w_enc: jax.Array | None = None, b_enc: jax.Array | None = None) -> jax.Array:
        """b_enc - b_dec W_enc (or b_enc without the pre-encoder bias): [width]."""
        w_enc = self.W_enc if w_enc is None else w_enc
        bias = self.b_enc if b_enc is None else b_enc
        if self.pre_encoder_bias:
            bias = bias - jnp.matmul(self.b_dec, w_enc, preferred_element_type=jnp.float32)
        return bias

    def decode(self, f: jax.Array, w_dec: jax.Array | None = None, b_dec: jax.Array | None = None) -> jax.Array:
        """x̂ = f W_dec + b_dec. f: [..., width] -> [..., d_model]."""
        w_dec = self.W_dec if w_dec is None else w_dec
        b_dec = self.b_dec if b_dec is None else b_dec
        dt = self.compute_dtype
        return jnp.matmul(f.astype(dt), w_dec.astype(dt), preferred_element_type=jnp.float32) + b_dec

    def outputs(self, z: jax.Array, f: jax.Array, **extra) -> dict[str, jax.Array]:
        """The dict every kind's forward pass returns: z, f, l0 [B], fired_per_latent [M], x_hat."""
        fired = f > 0
        return {
            "z": z,
            "f": f,
            "l0": jnp.sum(fired, axis=-1).astype(jnp.float32),
            "fired_per_latent": jnp.sum(fired, axis=0),
            "x_hat": self.decode(f),
            **extra,
        }


def constrain(params: dict) -> dict:
    """Projection applied after every optimizer update: unit-norm decoder rows, θ > 0."""
    params = dict(params)
    w = params["W_dec"]
    params["W_dec"] = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
    if "threshold" in params:
        params["threshold"] = jnp.maximum(params["threshold"], MIN_RAW_THRESHOLD)
    return params
