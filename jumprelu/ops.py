"""JumpReLU and Heaviside step with the rectangle-kernel straight-through gradients.

Both are `jax.custom_vjp` functions of `(z, threshold, bandwidth)` with
`z: [..., M]` (any number of leading axes) and `threshold: [M]` (or anything that
broadcasts against `z`). The pseudo-derivatives are those of Rajamanoharan et al.
(2024), with the rectangle kernel K(u) = 1 if -1/2 < u < 1/2 else 0:

  jumprelu(z) = z * H(z - θ):  d/dz = H(z - θ),  d/dθ = -(θ/ε) K((z - θ)/ε)
  step(z)     = H(z - θ):      d/dz = 0,         d/dθ = -(1/ε) K((z - θ)/ε)

JAX does not reduce a broadcast cotangent for us the way PyTorch autograd does, so
the θ cotangent is summed here over exactly the axes that θ was broadcast along
(every leading batch axis) and nothing else.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["jumprelu", "step", "rectangle"]


def rectangle(u: jax.Array) -> jax.Array:
    """K(u) = 1 on the open interval (-1/2, 1/2), else 0, in u's dtype."""
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


def _sum_to_shape(g: jax.Array, like: jax.Array) -> jax.Array:
    """Sums a cotangent of z's shape down to the shape (and dtype) of `like`."""
    lead = g.ndim - like.ndim
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(like.shape) if n == 1 and g.shape[lead + i] != 1
    )
    return jnp.sum(g, axis=axes).reshape(like.shape).astype(like.dtype)


def _kernel_window(z, threshold, bandwidth):
    """K((z - θ)/ε) computed in z's dtype: the band where the pseudo-gradient lives."""
    return rectangle((z - threshold) / bandwidth)


@jax.custom_vjp
def jumprelu(z: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """z * H(z - θ). z: [..., M]; threshold: [M]; returns [..., M] in z's dtype."""
    return z * (z > threshold).astype(z.dtype)


def _jumprelu_fwd(z, threshold, bandwidth):
    return jumprelu(z, threshold, bandwidth), (z, threshold, bandwidth)


def _jumprelu_bwd(res, g):
    z, threshold, bandwidth = res
    theta = threshold.astype(z.dtype)
    g_z = g * (z > theta).astype(g.dtype)
    g_theta = -(theta / bandwidth) * _kernel_window(z, theta, bandwidth) * g
    return g_z, _sum_to_shape(g_theta, threshold), jnp.zeros_like(bandwidth)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@jax.custom_vjp
def step(z: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """H(z - θ) as 0/1 in z's dtype. z: [..., M]; threshold: [M]."""
    return (z > threshold).astype(z.dtype)


def _step_fwd(z, threshold, bandwidth):
    return step(z, threshold, bandwidth), (z, threshold, bandwidth)


def _step_bwd(res, g):
    z, threshold, bandwidth = res
    theta = threshold.astype(z.dtype)
    g_theta = -(1.0 / bandwidth) * _kernel_window(z, theta, bandwidth) * g
    # d/dz is exactly zero: the sparsity term trains θ only.
    return jnp.zeros_like(z), _sum_to_shape(g_theta, threshold), jnp.zeros_like(bandwidth)


step.defvjp(_step_fwd, _step_bwd)
