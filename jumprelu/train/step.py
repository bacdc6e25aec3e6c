"""The pure train step `(state, batch) -> (state, metrics)`: no jit, no I/O."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jumprelu.core import sae
from jumprelu.train import guard
from jumprelu.train.optim import Schedule
from jumprelu.train.state import STACK_AXES, TrainState

StepFn = Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    sparsity: Schedule,
    learning_rate: Schedule,
    loss: Callable,
    skip_nonfinite: bool = False,
) -> StepFn:
    """batch: [B, d_model] raw activations; normalised by the state's scale inside the step.

    loss: the SAE kind's (model, params, stats, x, λ) -> (loss, (metrics, stats)).
    skip_nonfinite: drop an update whose loss or result is not finite (guard.skip_if_nonfinite);
      metrics then carry `skipped_batches`, the count so far.
    """

    def train_step(state: TrainState, batch: jax.Array):
        lam = sparsity(state.step)
        x = batch.astype(jnp.float32) / state.scale

        def loss_fn(params):
            return loss(model, params, state.stats, x, lam)

        (loss_value, (metrics, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = sae.constrain(optax.apply_updates(state.params, updates))
        # the λ the loss applied: with a target L0 the controller's, not the (unused) warm-up schedule
        applied = metrics.get("sparsity_coefficient_adaptive", lam)
        metrics = dict(metrics, sparsity_coefficient=applied, lr=learning_rate(state.step))
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, stats=stats)
        if skip_nonfinite:
            new = guard.skip_if_nonfinite(new, state, loss_value)
            metrics["skipped_batches"] = new.skipped
        return new, metrics

    return train_step


def make_stacked_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    unit_sparsity: Schedule,
    learning_rate: Schedule,
    sparsity_coefficients,
    loss: Callable,
    skip_nonfinite: bool = False,
) -> StepFn:
    """K SAEs, one per λ, updated in one step on the same batch (state stacked, see state.STACK_AXES).

    unit_sparsity: the λ schedule for peak 1; member i uses unit_sparsity(step) · λ_i, the same
    value a single run's schedule with peak λ_i gives. Metrics come back with a leading K axis.
    """
    lams = jnp.asarray(sparsity_coefficients, jnp.float32)

    def member_step(state: TrainState, batch: jax.Array, lam_peak: jax.Array):
        step_fn = make_train_step(
            model, tx, lambda t: unit_sparsity(t) * lam_peak, learning_rate, loss, skip_nonfinite=skip_nonfinite
        )
        return step_fn(state, batch)

    def train_step(state: TrainState, batch: jax.Array):
        return jax.vmap(member_step, in_axes=(STACK_AXES, None, 0), out_axes=(STACK_AXES, 0))(state, batch, lams)

    return train_step
