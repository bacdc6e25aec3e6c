"""Folding the input scale C into the parameters, so users feed raw activations.

Training sees x/C. With row vectors, z = (x/C - b_dec) W_enc + b_enc; multiplying
through by C gives parameters that take raw x directly:
  W_enc' = W_enc,  b_enc' = C (b_enc - b_dec W_enc),  θ' = C θ,
  W_dec' = W_dec,  b_dec' = C b_dec,
so that f' = JumpReLU_θ'(x W_enc' + b_enc') = C f and x̂ = f' W_dec' + b_dec' = C x̂_norm.
This is the layout Gemma Scope releases (`params.npz`).
"""

from __future__ import annotations

import jax.numpy as jnp

from jumprelu.sae import threshold_of

FOLDED_KEYS = ("W_enc", "b_enc", "threshold", "W_dec", "b_dec")


def fold(params: dict, scale, pre_encoder_bias: bool = True) -> dict:
    """Training params (normalised units) -> folded params in raw activation units.

    `params` holds θ as `threshold` or `log_threshold` (a kind's `export` gives `threshold`);
    a TopK SAE's `k` passes through unchanged.
    """
    c = jnp.asarray(scale, jnp.float32)
    w_enc, b_enc, b_dec = params["W_enc"], params["b_enc"], params["b_dec"]
    if pre_encoder_bias:
        b_enc = b_enc - b_dec @ w_enc
    return {
        "W_enc": w_enc,
        "b_enc": c * b_enc,
        "threshold": c * threshold_of(params),
        "W_dec": params["W_dec"],
        "b_dec": c * b_dec,
        **({"k": params["k"]} if "k" in params else {}),
    }
