"""The pure train step `(state, batch) -> (state, metrics)`: no jit, no I/O."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jumprelu import losses, sae
from jumprelu.optim import Schedule
from jumprelu.state import TrainState

StepFn = Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    sparsity: Schedule,
    learning_rate: Schedule,
    loss: Callable | None = None,
) -> StepFn:
    """batch: [B, d_model] raw activations; normalised by the state's scale inside the step.

    loss: the SAE kind's (model, params, stats, x, λ) -> (loss, (metrics, stats)); JumpReLU's by default.
    """
    loss = loss or losses.make_jumprelu_loss()

    def train_step(state: TrainState, batch: jax.Array):
        lam = sparsity(state.step)
        x = batch.astype(jnp.float32) / state.scale

        def loss_fn(params):
            return loss(model, params, state.stats, x, lam)

        (_, (metrics, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = sae.constrain(optax.apply_updates(state.params, updates))
        metrics = dict(metrics, sparsity_coefficient=lam, lr=learning_rate(state.step))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, stats=stats), metrics

    return train_step
