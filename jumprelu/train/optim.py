"""Optimizer, schedules and the decoder-norm gradient projection.

Paper recipe (all config fields under `train`): Adam(β1=0, β2=0.999, eps=1e-8);
lr 7e-5 with a cosine warm-up from 0.1·lr to lr over 1,000 steps, then constant; no weight
decay (`train.encoder_weight_decay` adds AdamW's decoupled decay to W_enc);
λ warmed up linearly from 0 over 10,000 steps; no gradient clipping. Decoder rows
are kept at unit norm: before Adam sees the gradient, each row's component parallel
to the row is projected out; after the update the rows are renormalised
(`sae.constrain`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], jax.Array]


def cosine_warmup(peak: float, warmup_steps: int, start_factor: float) -> Schedule:
    """start_factor·peak at step 0, rising along a half cosine to peak at warmup_steps, then flat."""

    def schedule(step):
        if warmup_steps <= 0:
            return jnp.asarray(peak, jnp.float32)
        t = jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)
        rise = 0.5 * (1.0 - jnp.cos(jnp.pi * t))
        return peak * (start_factor + (1.0 - start_factor) * rise)

    return schedule


def linear_warmup(peak: float, warmup_steps: int) -> Schedule:
    """0 at step 0, rising linearly to peak at warmup_steps, then flat."""

    def schedule(step):
        if warmup_steps <= 0:
            return jnp.asarray(peak, jnp.float32)
        t = jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)
        return peak * t

    return schedule


def remove_parallel_component(w: jax.Array, g: jax.Array) -> jax.Array:
    """g - (g·ŵ)ŵ row by row. w, g: [M, d]; rows of w need not be exactly unit norm."""
    w_hat = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
    return g - jnp.sum(g * w_hat, axis=-1, keepdims=True) * w_hat


def project_decoder_gradient(key: str = "W_dec") -> optax.GradientTransformation:
    """Stateless transform: removes the gradient of W_dec along its own rows."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("project_decoder_gradient needs params passed to update()")
        updates = dict(updates)
        updates[key] = remove_parallel_component(params[key], updates[key])
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def linear_decay_tail(schedule: Schedule, total_steps: int, fraction: float) -> Schedule:
    """`schedule`, times a factor falling linearly from 1 to 0 over the last `fraction` of the run."""
    if fraction <= 0:
        return schedule
    start = total_steps * (1.0 - fraction)
    span = max(total_steps - start, 1.0)

    def decayed(step):
        factor = jnp.clip((total_steps - jnp.asarray(step, jnp.float32)) / span, 0.0, 1.0)
        return schedule(step) * factor

    return decayed


def undecayed_learning_rate_schedule(train_cfg) -> Schedule:
    """`learning_rate_schedule` without the final decay (θ's, with `train.decay_thresholds=False`)."""
    return cosine_warmup(train_cfg.lr, train_cfg.lr_warmup_steps, train_cfg.lr_warmup_start_factor)


def learning_rate_schedule(train_cfg) -> Schedule:
    """Cosine warm-up then constant (paper); `train.lr_decay_fraction` adds a linear decay to 0
    over that final share of `train.steps`."""
    warm = undecayed_learning_rate_schedule(train_cfg)
    return linear_decay_tail(warm, train_cfg.steps, train_cfg.get("lr_decay_fraction", 0.0))


THRESHOLD_LEAVES = ("threshold", "log_threshold")


def scale_by_learning_rates(schedule: Schedule, threshold_schedule: Schedule) -> optax.GradientTransformation:
    """optax.scale_by_learning_rate(schedule) (same state, so checkpoints are interchangeable),
    with θ's leaves (any nesting, stacked or not) scaled by threshold_schedule instead."""

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        lr, lr_theta = schedule(state.count), threshold_schedule(state.count)
        is_theta = _named(*THRESHOLD_LEAVES)(updates)
        updates = jax.tree.map(lambda u, th: -jnp.asarray(lr_theta if th else lr, u.dtype) * u, updates, is_theta)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_adam_thresholds_apart(b1: float, b2: float, b2_theta: float, eps: float) -> optax.GradientTransformation:
    """optax.scale_by_adam(b1, b2, eps) with θ's leaves (any nesting, stacked or not) keeping their
    second moment at b2_theta: the same state (count, mu, nu), so checkpoints are interchangeable.
    A faster-forgetting β2 lets the weights of latents that stopped firing move again sooner, while
    θ, which sets L0 and is steered by the target-L0 controller, keeps the smoother one."""
    base = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def update_fn(updates, state, params=None):
        del params
        # the moments and bias corrections exactly as optax's Adam computes them, per leaf
        b2s = jax.tree.map(lambda th: b2_theta if th else b2, _named(*THRESHOLD_LEAVES)(updates))
        mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, updates, state.mu)
        nu = jax.tree.map(lambda g, v, b: (1 - b) * g**2 + b * v, updates, state.nu, b2s)
        count = optax.safe_increment(state.count)

        def corrected(moment, decay):
            return optax.tree.bias_correction(moment, decay, count)

        out = jax.tree.map(lambda m, v, b: corrected(m, b1) / (jnp.sqrt(corrected(v, b)) + eps), mu, nu, b2s)
        return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(base.init, update_fn)


def sparsity_warmup_steps(train_cfg) -> int:
    """`train.sparsity_warmup_steps`, or `train.sparsity_warmup_fraction` of `train.steps` when set."""
    fraction = train_cfg.get("sparsity_warmup_fraction")
    return train_cfg.sparsity_warmup_steps if fraction is None else int(fraction * train_cfg.steps)


def sparsity_schedule(train_cfg, sparsity_coefficient: float) -> Schedule:
    return linear_warmup(sparsity_coefficient, sparsity_warmup_steps(train_cfg))


def _named(*names: str):
    """An optax mask: True for the leaves called one of `names` (any nesting, stacked or not)."""

    def mask(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) in names, params)

    return mask


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    parts = [project_decoder_gradient()]
    if train_cfg.clip_grad_norm > 0:  # off by default: the papers clip nothing
        parts.append(optax.clip_by_global_norm(train_cfg.clip_grad_norm))
    b2_theta = train_cfg.get("adam_b2_thresholds")
    if b2_theta is None or b2_theta == train_cfg.adam_b2:
        parts.append(optax.scale_by_adam(b1=train_cfg.adam_b1, b2=train_cfg.adam_b2, eps=train_cfg.adam_eps))
    else:
        parts.append(scale_by_adam_thresholds_apart(train_cfg.adam_b1, train_cfg.adam_b2, b2_theta, train_cfg.adam_eps))
    update_clip = train_cfg.get("adam_update_clip", 0.0)
    if update_clip > 0:
        # With β1 = 0 a parameter whose gradient was zero for long (a rarely firing or dead latent)
        # gets |g / √v̂| up to √(1/(1 − β2)) ≈ 32 on its first gradient: a sign-like step of 32·lr
        # on every entry of its encoder column. Clipping each entry of the Adam direction to
        # ±adam_update_clip bounds it; a steady gradient's |g / √v̂| is about 1 and passes.
        parts.append(optax.clip(update_clip))
    decay = train_cfg.get("encoder_weight_decay", 0.0)
    if decay > 0:  # AdamW's decoupled decay, on W_enc only (decoder rows are held at unit norm)
        parts.append(optax.add_decayed_weights(decay, mask=_named("W_enc")))
    # θ sets L0: with `train.decay_thresholds=False` it keeps its lr through the final decay, so
    # the target-L0 controller can still move it while the other weights anneal
    lr = learning_rate_schedule(train_cfg)
    if train_cfg.get("decay_thresholds", True):
        parts.append(optax.scale_by_learning_rate(lr))
    else:
        parts.append(scale_by_learning_rates(lr, undecayed_learning_rate_schedule(train_cfg)))
    return optax.chain(*parts)
