"""JumpReLU and Heaviside step with the rectangle-kernel straight-through gradients.

All ops are `jax.custom_vjp` functions of `(z, threshold, bandwidth)` with
`z: [..., M]` (any number of leading axes) and `threshold: [M]` (or anything that
broadcasts against `z`). The pseudo-derivatives are those of Rajamanoharan et al.
(2024), with the rectangle kernel K(u) = 1 if -1/2 < u < 1/2 else 0:

  jumprelu(z) = z * H(z - θ):  d/dz = H(z - θ),  d/dθ = -(θ/ε) K((z - θ)/ε)
  heaviside(z) = H(z - θ):      d/dz = 0,         d/dθ = -(1/ε) K((z - θ)/ε)

JAX does not reduce a broadcast cotangent for us the way PyTorch autograd does, so
the θ cotangent is summed here over exactly the axes that θ was broadcast along
(every leading batch axis) and nothing else.

`jumprelu_l0` returns both f = jumprelu(z) and the per-row count Σ_M heaviside(z) from one
op, so that the loss's backward pass reads z once for both θ terms; its gradients are
exactly those of the two separate ops.

`jumprelu_l0_ste_z` is the same op with the straight-through term passed to z as well
(Anthropic, 2025): the jump at θ is differentiated in z too, so d/dz of jumprelu gains
+(θ/ε) K((z - θ)/ε) and d/dz of heaviside is (1/ε) K((z - θ)/ε): the negative of each
θ term. The encoder then learns from rows near the threshold what firing there would
gain in reconstruction and cost in L0, where the paper's gradient trains θ only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jumprelu.core import backend

__all__ = ["jumprelu", "heaviside", "jumprelu_l0", "jumprelu_l0_ste_z", "fired_per_latent", "rectangle"]


def rectangle(u: jax.Array) -> jax.Array:
    """K(u) = 1 on the open interval (-1/2, 1/2), else 0, in u's dtype."""
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


def _kernel_window(z, threshold, bandwidth):
    """K((z - θ)/ε): the band around θ where the pseudo-gradient lives."""
    return rectangle((z - threshold) / bandwidth)


# XLA:CPU writes the elementwise producer of a reduction to memory before reducing it;
# for a [B, M] operand that fresh buffer costs more than the arithmetic. Processing
# row blocks inside a loop keeps every temporary small, so each [B, M] array is read
# once and written once. Other backends fuse producers into reductions, so they take
# the whole array in one block, and so does a step partitioned over a multi-device mesh
# (blocking there would split the one [B, d] all-reduce into one per block).
_BLOCK_ROWS = 256


def _num_blocks(z: jax.Array, threshold: jax.Array) -> int:
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        return 1
    rows = math.prod(z.shape[:-1])
    if backend.target() == "cpu" and threshold.ndim <= 1 and rows >= 2 * _BLOCK_ROWS and rows % _BLOCK_ROWS == 0:
        return rows // _BLOCK_ROWS
    return 1


def _by_row_blocks(fn, z, threshold, *extra):
    """Runs fn(z_blk, θ, *extra_blk) -> (per_row, col_sums) over row blocks of z.

    z: [..., M]; extras: [..., M] or [..., 1]; θ: [M] or []. fn sees 2-D blocks
    [rows, ·] and returns per-row outputs [rows, ...] and column sums [M]. Returns the
    per-row outputs with z's leading axes restored and the column sums summed over
    blocks and reduced to θ's shape and dtype: the θ cotangent is summed over every
    leading axis and only those.
    """
    lead = z.shape[:-1]
    rows = math.prod(lead)
    theta = threshold.astype(z.dtype)
    n = _num_blocks(z, threshold)
    blocks = [a.reshape(n, rows // n, a.shape[-1]) for a in (z, *extra)]
    if n == 1:
        z_blk, *extra_blk = (b[0] for b in blocks)
        per_row, sums = fn(z_blk, theta, *extra_blk)
    else:
        per_row, sums = jax.lax.map(lambda bs: fn(bs[0], theta, *bs[1:]), blocks)
        sums = jax.tree.map(lambda a: jnp.sum(a, axis=0), sums)
    per_row = jax.tree.map(lambda a: a.reshape(lead + a.shape[(1 if n == 1 else 2) :]), per_row)
    sums = jax.tree.map(lambda a: (a if threshold.ndim else jnp.sum(a)).astype(threshold.dtype), sums)
    return per_row, sums


def _check_threshold(z, threshold):
    if threshold.ndim > 1 or (threshold.ndim == 1 and threshold.shape[0] != z.shape[-1]):
        raise ValueError(f"threshold must have shape [M] = [{z.shape[-1]}] or [], found {list(threshold.shape)}")


def _check_bandwidth(bandwidth):
    """ε ≤ 0 made every θ gradient NaN (0/0) or silently zero: refused where ε is a known number (a
    traced ε, e.g. one scaled by the data's spread, is the config's, which checked it)."""
    try:
        eps = float(bandwidth)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return
    if not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"bandwidth must be a finite number > 0 (the kernel's width ε), found {eps}")


def fired_per_latent(z: jax.Array, threshold: jax.Array) -> jax.Array:
    """How many rows of z: [..., M] fire each latent (z > θ): [M] float32, no gradient."""
    _check_threshold(z, threshold)
    z, theta32 = jax.lax.stop_gradient(z), jax.lax.stop_gradient(threshold).astype(jnp.float32)
    theta = jnp.broadcast_to(theta32, z.shape[-1:])  # counts are per latent even for a scalar θ
    _, counts = _by_row_blocks(lambda z_, t_: ((), jnp.sum((z_ > t_).astype(jnp.float32), axis=0)), z, theta)
    return counts


def _zero(bandwidth):
    return jnp.zeros_like(bandwidth)


def _masked(z, theta, values):
    return jnp.where(z > theta, values, jnp.zeros((), values.dtype))


@jax.custom_vjp
def jumprelu(z: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """z * H(z - θ). z: [..., M]; threshold: [M]; returns [..., M] in z's dtype."""
    return _masked(z, threshold, z)


def _jumprelu_fwd(z, threshold, bandwidth):
    _check_bandwidth(bandwidth)
    _check_threshold(z, threshold)
    return jumprelu(z, threshold, bandwidth), (z, threshold, bandwidth)


def _jumprelu_bwd(res, g):
    z, threshold, eps = res

    def blk(z_, t_, g_):
        return _masked(z_, t_, g_), jnp.sum(-(t_ / eps) * _kernel_window(z_, t_, eps) * g_, axis=0)

    g_z, g_theta = _by_row_blocks(blk, z, threshold, g)
    return g_z, g_theta, _zero(eps)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@jax.custom_vjp
def heaviside(z: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """H(z - θ) as 0/1 in z's dtype. z: [..., M]; threshold: [M]."""
    return (z > threshold).astype(z.dtype)


def _heaviside_fwd(z, threshold, bandwidth):
    _check_bandwidth(bandwidth)
    _check_threshold(z, threshold)
    return heaviside(z, threshold, bandwidth), (z, threshold, bandwidth)


def _heaviside_bwd(res, g):
    z, threshold, eps = res

    def blk(z_, t_, g_):
        return (), jnp.sum(-(1.0 / eps) * _kernel_window(z_, t_, eps) * g_, axis=0)

    _, g_theta = _by_row_blocks(blk, z, threshold, g)
    # d/dz is exactly zero: the sparsity term trains θ only.
    return jnp.zeros_like(z), g_theta, _zero(eps)


heaviside.defvjp(_heaviside_fwd, _heaviside_bwd)


@jax.custom_vjp
def jumprelu_l0(z: jax.Array, threshold: jax.Array, bandwidth: float) -> tuple[jax.Array, jax.Array]:
    """(jumprelu(z, θ, ε) [..., M], Σ_M heaviside(z, θ, ε) [...]) with the same pseudo-gradients."""
    _check_threshold(z, threshold)

    def blk(z_, t_):
        fired = z_ > t_
        return (jnp.where(fired, z_, jnp.zeros((), z_.dtype)), jnp.sum(fired, axis=-1, dtype=z_.dtype)), ()

    (f, l0), _ = _by_row_blocks(blk, z, threshold)
    return f, l0


def _jumprelu_l0_fwd(z, threshold, bandwidth):
    _check_bandwidth(bandwidth)
    return jumprelu_l0(z, threshold, bandwidth), (z, threshold, bandwidth)


def _jumprelu_l0_bwd(res, g):
    z, threshold, eps = res
    g_f, g_l0 = g

    def blk(z_, t_, gf_, gl0_):  # ∂z and both θ terms from one read of z and ∂f
        g_theta = _kernel_window(z_, t_, eps) * (-(t_ / eps) * gf_ - gl0_ / eps)
        return _masked(z_, t_, gf_), jnp.sum(g_theta, axis=0)

    g_z, g_theta = _by_row_blocks(blk, z, threshold, g_f, g_l0[..., None].astype(z.dtype))
    return g_z, g_theta, _zero(eps)


jumprelu_l0.defvjp(_jumprelu_l0_fwd, _jumprelu_l0_bwd)


@jax.custom_vjp
def jumprelu_l0_ste_z(z: jax.Array, threshold: jax.Array, bandwidth: float) -> tuple[jax.Array, jax.Array]:
    """`jumprelu_l0` whose straight-through θ terms reach z too (with the opposite sign)."""
    return jumprelu_l0(z, threshold, bandwidth)


def _jumprelu_l0_ste_z_bwd(res, g):
    z, threshold, eps = res
    g_f, g_l0 = g

    def blk(z_, t_, gf_, gl0_):
        g_theta = _kernel_window(z_, t_, eps) * (-(t_ / eps) * gf_ - gl0_ / eps)
        return _masked(z_, t_, gf_) - g_theta, jnp.sum(g_theta, axis=0)

    g_z, g_theta = _by_row_blocks(blk, z, threshold, g_f, g_l0[..., None].astype(z.dtype))
    return g_z, g_theta, _zero(eps)


jumprelu_l0_ste_z.defvjp(_jumprelu_l0_fwd, _jumprelu_l0_ste_z_bwd)
