"""The dense JumpReLU forward and its vjp over row blocks: the reference the sparse step
(`sparse.py`) must equal, and its fallback for a batch beyond capacity. On XLA:CPU the rows go
in blocks so that no [B, M] temporary outlives its block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jumprelu.core import backend, ops

_BLOCK_ROWS = 256  # rows per block of z on XLA:CPU: every [rows, M] temporary stays small


def row_blocks(rows: int) -> int:
    """How many row blocks the CPU path uses (1 on other backends and on multi-device meshes)."""
    mesh = jax.sharding.get_abstract_mesh()
    if (not mesh.empty and mesh.size > 1) or backend.target() != "cpu":
        return 1
    if rows >= 2 * _BLOCK_ROWS and rows % _BLOCK_ROWS == 0:
        return rows // _BLOCK_ROWS
    return 1


def pre_acts(x, w_enc, bias, dtype):
    """z = x W_enc + bias with the product's operands in `dtype`, accumulated in float32."""
    return jnp.matmul(x.astype(dtype), w_enc.astype(dtype), preferred_element_type=jnp.float32) + bias


def window_coord(z, theta, eps):
    """(z - θ)/ε, written exactly as `ops.rectangle` sees it, so the candidate set and the
    kernel window agree with the dense ops bit for bit."""
    return (z - theta) / eps


def dense_forward(x, w_enc, bias, theta, w_dec, b_dec, eps, dtype=jnp.float32):
    """The reference: the same outputs from dense [B, M] arrays through `ops`."""
    z = pre_acts(x, w_enc, bias, dtype)
    f, l0 = ops.jumprelu_l0(z, theta, eps)
    counts = jnp.sum(ops.heaviside(z, theta, eps), axis=0)
    x_hat = jnp.matmul(f.astype(dtype), w_dec.astype(dtype), preferred_element_type=jnp.float32) + b_dec
    return x_hat, l0, counts, jnp.sum(f, axis=0)


def blocked(n, *arrays):
    return [a.reshape(n, a.shape[0] // n, *a.shape[1:]) for a in arrays]


def dense_in_blocks(x, w_enc, bias, theta, w_dec, b_dec, eps, dtype):
    """`dense_forward` one row block at a time, for an overflowing batch: XLA reserves memory for
    both branches of the overflow `cond`, so the fallback must not need [B, M] arrays either."""
    n = row_blocks(x.shape[0])
    if n == 1:
        return dense_forward(x, w_enc, bias, theta, w_dec, b_dec, eps, dtype)
    x_hat, l0, counts, f_sum = jax.lax.map(
        lambda xb: dense_forward(xb, w_enc, bias, theta, w_dec, b_dec, eps, dtype), blocked(n, x)[0]
    )
    return x_hat.reshape(x.shape[0], -1), l0.reshape(-1), jnp.sum(counts, axis=0), jnp.sum(f_sum, axis=0)


def dense_grads_in_blocks(x, params, eps, dtype, g_xhat, g_l0, g_counts, g_fsum):
    """The vjp of `dense_forward` summed over row blocks (the per-latent sums' cotangents reach
    every block, since each block's counts and f_sum add into the batch's)."""
    n = row_blocks(x.shape[0])

    def block_vjp(xb, gx, gl):
        _, vjp = jax.vjp(lambda *p: dense_forward(xb, *p, eps, dtype), *params)
        return vjp((gx, gl, g_counts, g_fsum))

    if n == 1:
        return block_vjp(x, g_xhat, g_l0)

    def body(acc, blk):
        return jax.tree.map(jnp.add, acc, block_vjp(*blk)), None

    zeros = jax.tree.map(jnp.zeros_like, tuple(params))
    grads, _ = jax.lax.scan(body, zeros, blocked(n, x, g_xhat, g_l0))
    return grads
