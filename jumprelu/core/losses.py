"""What every SAE kind's loss shares: the reconstruction term and the batch metrics.

On the normalised scale x/C, the reconstruction term is ‖x_b - x̂_b‖² summed over d_model
(not averaged: that is what makes λ comparable with the paper's values). Each kind adds its
own sparsity term (`jumprelu.core.kinds`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def squared_error(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """‖x - x̂‖² per row. x, x_hat: [B, d] -> [B]."""
    return jnp.sum(jnp.square(x - x_hat), axis=-1)


def reconstruction_metrics(
    x: jax.Array, x_hat: jax.Array, l0: jax.Array, fired_per_latent: jax.Array
) -> dict[str, jax.Array]:
    """Batch statistics shared by every SAE kind.

    x, x_hat: [B, d]; l0: [B] active latents per row; fired_per_latent: [M] counts.
    """
    x, x_hat, l0 = (jax.lax.stop_gradient(a) for a in (x, x_hat, l0))
    sq_err = squared_error(x, x_hat)  # [B]
    centred = x - jnp.mean(x, axis=0, keepdims=True)
    total_var = jnp.sum(jnp.square(centred))
    return {
        "mse": jnp.mean(sq_err),
        "l0": jnp.mean(l0),
        "fvu": jnp.sum(sq_err) / jnp.maximum(total_var, 1e-30),
        "frac_fired": jnp.mean((fired_per_latent > 0).astype(jnp.float32)),
    }


def reconstruction(x: jax.Array, out: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(‖x - x̂‖² per row [B], batch metrics) from a kind's forward outputs `out`."""
    metrics = reconstruction_metrics(x, out["x_hat"], out["l0"], out["fired_per_latent"])
    return squared_error(x, out["x_hat"]), metrics


def nested_reconstructions(
    f: jax.Array, w_dec: jax.Array, b_dec: jax.Array, widths: tuple[int, ...], dtype=jnp.float32
) -> list:
    """x̂ from each prefix of the latents (Matryoshka): [f[:, :m] W_dec[:m] + b_dec for m in widths].

    f: [B, M]; widths: increasing, the last one M; dtype: the products' operands (the SAE's
    compute_dtype, so the last prefix is its own decode), accumulated in float32. One pass over
    the latents in segments, so the cost is that of a single decode.
    """
    f, w_dec = f.astype(dtype), w_dec.astype(dtype)
    out, partial, start = [], b_dec, 0
    for end in widths:
        partial = partial + jnp.matmul(f[:, start:end], w_dec[start:end], preferred_element_type=jnp.float32)
        out.append(partial)
        start = end
    return out
