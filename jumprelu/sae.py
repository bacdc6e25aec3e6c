"""The JumpReLU sparse autoencoder as a Flax Linen module.

Why Linen: the SAE's parameters are a plain dict of five arrays, and everything
around them is functional -- the pure train step, `jax.eval_shape` for abstract
state, the one sharding table keyed by parameter name, orbax restore into an
abstract target, `vmap` over stacked SAEs -- all of which take a dict directly.
Gemma's model is Linen too, so splicing an SAE into it needs no bridge.

The module works on *normalised* inputs x/C (E‖x/C‖² = 1); the scale C lives in the
train state and is folded out for users by `jumprelu.fold`. Shapes (row vectors):
  x: [..., d_model]   z, f: [..., width]
  W_enc: [d_model, width]   b_enc: [width]   threshold: [width]
  W_dec: [width, d_model]   b_dec: [d_model]
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jumprelu import ops

THRESHOLD_PARAMS = ("log", "raw")
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

    Kinds (`jumprelu/kinds/`) add their own parameters and activation on top.
    """

    d_model: int
    width: int
    pre_encoder_bias: bool = True  # subtract b_dec before encoding (paper default)
    compute_dtype: Any = jnp.float32  # dtype of the matmuls; parameters stay float32

    def setup(self):
        # Every param gets an explicit shape and an init taking (key, shape, dtype=None): importing
        # gemma replaces nn.Module.param process-wide with a version that requires both.
        self.W_dec = self.param("W_dec", init_decoder, (self.width, self.d_model))
        # W_enc starts as W_decᵀ and is untied from then on. Linen calls an init fn only
        # during `init`, so closing over the fresh W_dec ties the two at init time only.
        self.W_enc = self.param(
            "W_enc", lambda _key, _shape, _dtype=None: jnp.transpose(self.W_dec), (self.d_model, self.width)
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
        b_enc = self.b_enc if b_enc is None else b_enc
        dt = self.compute_dtype
        z = jnp.matmul(x.astype(dt), w_enc.astype(dt), preferred_element_type=jnp.float32)
        bias = b_enc
        if self.pre_encoder_bias:
            bias = bias - jnp.matmul(self.b_dec, w_enc, preferred_element_type=jnp.float32)
        return z + bias

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


def constrain(params: dict) -> dict:
    """Projection applied after every optimizer update: unit-norm decoder rows, θ > 0."""
    params = dict(params)
    w = params["W_dec"]
    params["W_dec"] = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
    if "threshold" in params:
        params["threshold"] = jnp.maximum(params["threshold"], MIN_RAW_THRESHOLD)
    return params


def from_config(sae_cfg, d_model: int) -> JumpReLUSAE:
    """Builds the module from the `sae` section of the config."""
    return JumpReLUSAE(
        d_model=d_model,
        width=sae_cfg.width,
        bandwidth=sae_cfg.bandwidth,
        threshold_init=sae_cfg.threshold_init,
        threshold_param=sae_cfg.threshold_param,
        pre_encoder_bias=sae_cfg.pre_encoder_bias,
        compute_dtype=jnp.dtype(sae_cfg.compute_dtype),
    )
