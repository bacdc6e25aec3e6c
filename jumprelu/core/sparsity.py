"""Sparsity terms of the JumpReLU loss, each a pure function of one batch.

  step       λ · mean_b Σ_i H(z_bi - θ_i)                         the paper's L0 (θ-gradient only)
  quadratic  λ · (2/T) · (mean_b Σ_i H(z_bi - θ_i) - T)²           Gemma Scope 2's penalty around a
                                                                   target L0 T (θ-gradient only)
  quadratic_rows  λ · mean_b (2/T) · (Σ_i H(z_bi - θ_i) - T)²      the same per row (SAELens 6.x)
  tanh       λ · mean_b Σ_i tanh(c · f_bi · ‖W_dec,i‖)             Anthropic (Jan 2025): a smooth L0
                                                                   that also trains W_enc, b_enc
and the optional extras
  frequency  μ · Σ_i relu(p_i - limit),  p_i = mean_b H(z_bi - θ_i)  Gemma Scope 2: no latent may fire
                                                                   on more than `limit` of tokens
  pre_act    ν · mean_b Σ_{i dead} relu(θ_i - z_bi) · ‖W_dec,i‖     Anthropic: pulls dead latents'
                                                                   pre-activations up to θ
H goes through the rectangle-kernel straight-through estimator (`ops.heaviside`), f through
`ops.jumprelu`, so every θ-gradient here is the paper's pseudo-derivative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jumprelu.core import ops

LOSSES = ("step", "quadratic", "quadratic_rows", "tanh")


def l0_per_row(z: jax.Array, theta: jax.Array, bandwidth) -> jax.Array:
    """Σ_i H(z_bi - θ_i) with the straight-through θ-gradient. z: [B, M] -> [B]."""
    return jnp.sum(ops.heaviside(z, theta, bandwidth), axis=-1)


def step_loss(l0_rows: jax.Array, lam) -> jax.Array:
    """λ · mean_b L0_b. l0_rows: [B] (from `l0_per_row` or `ops.jumprelu_l0`)."""
    return lam * jnp.mean(l0_rows)


def quadratic_loss(l0_rows: jax.Array, lam, target: float) -> jax.Array:
    """λ · (2/T) · (mean_b L0_b - T)²: zero at the target, the step loss's slope λ at L0 = 2T."""
    return lam * (2.0 / target) * jnp.square(jnp.mean(l0_rows) - target)


def quadratic_rows_loss(l0_rows: jax.Array, lam, target: float) -> jax.Array:
    """λ · mean_b (2/T) · (L0_b - T)²: the quadratic per row, as SAELens 6.x's quadratic mode
    computes it. Unlike `quadratic_loss` it pulls every row's L0 toward T: rows above T are
    pushed down harder, rows below T (few latents for a hard token) are pushed up."""
    return lam * (2.0 / target) * jnp.mean(jnp.square(l0_rows - target))


def tanh_loss(f: jax.Array, decoder_norms: jax.Array, lam, scale: float) -> jax.Array:
    """λ · mean_b Σ_i tanh(c · f_bi · ‖W_dec,i‖). f: [B, M]; decoder_norms: [M]."""
    return lam * jnp.mean(jnp.sum(jnp.tanh(scale * f * decoder_norms), axis=-1))


def frequency_penalty(
    z: jax.Array, theta: jax.Array, bandwidth, coefficient: float, limit: float, spared: int = 0
) -> jax.Array:
    """μ · Σ_i relu(p_i - limit) with p_i the share of the batch latent i fires on, leaving out the
    `spared` latents that fire most often in the batch."""
    counts = jnp.sum(ops.heaviside(z, theta, bandwidth), axis=0)
    return frequency_penalty_of_counts(counts, z.shape[0], coefficient, limit, spared)


def frequency_penalty_of_counts(
    counts: jax.Array, rows: int, coefficient: float, limit: float, spared: int = 0
) -> jax.Array:
    """The frequency penalty from counts_i = Σ_b H(z_bi - θ_i) [M] (straight-through w.r.t. θ).

    spared > 0: the `spared` most frequent latents of the batch are not penalised (exactly that
    many, ties broken by index), so a few dense directions may stay dense.
    """
    excess = jax.nn.relu(counts / rows - limit)
    if spared:
        _, most = jax.lax.top_k(jax.lax.stop_gradient(counts), spared)
        excess = excess.at[most].set(0.0)
    return coefficient * jnp.sum(excess)


def pre_act_loss(z: jax.Array, theta: jax.Array, dead: jax.Array, decoder_norms: jax.Array, coefficient: float):
    """ν · mean_b Σ_i dead_i · relu(θ_i - z_bi) · ‖W_dec,i‖. dead: [M] bool."""
    gap = jax.nn.relu(theta - z) * (dead.astype(z.dtype) * decoder_norms)
    return coefficient * jnp.mean(jnp.sum(gap, axis=-1))


def pre_act_loss_of_sums(z_sum, f_sum, counts, theta, dead, decoder_norms, rows: int, coefficient: float):
    """`pre_act_loss` from per-latent batch sums, for the sparse step (no [B, M] array).

    relu(θ - z) = (θ - z) + (z - θ)·H(z - θ) = (θ - z) + f - θ·H, so Σ_b relu(θ_i - z_bi) =
    B θ_i - Σ_b z_bi + Σ_b f_bi - θ_i Σ_b H(z_bi - θ_i). With f_sum and counts carrying the
    straight-through θ-gradients, their kernel terms cancel (-(θ/ε)K from f, +(θ/ε)K from θ·H)
    and every gradient equals the dense form's. z_sum, f_sum, counts, theta, dead: [M].
    """
    gap = rows * theta - z_sum + f_sum - theta * counts
    return coefficient * jnp.sum(gap * (dead.astype(gap.dtype) * decoder_norms)) / rows
