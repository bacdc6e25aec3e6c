"""The backend whose measured rules choose a step's form: JAX's own, or the one a plan is for.

`jumprelu plan` compiles a TPU slice's step on fake CPU devices. The choices that follow the
backend (the sparse JumpReLU step, TopK's sparse decoder, XLA:CPU's row blocks of z) must then
be the TPU's, or the plan reports the memory and FLOPs of a program the TPU never runs (a
16K-latent recipe step planned at 0.04 TFLOP, a tenth of its dense work, on the CPU's sparse rule).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

# a context variable, not a global: a plan traced in one thread leaves another's training alone
_planned: contextvars.ContextVar[str | None] = contextvars.ContextVar("planned_backend", default=None)


def target() -> str:
    """'cpu', 'gpu', 'tpu', ...: the backend being planned for, else JAX's default backend."""
    return _planned.get() or jax.default_backend()


@contextlib.contextmanager
def planning_for(name: str | None):
    """Within it, `target()` is `name` (None: JAX's own): trace and compile here what `name` would run."""
    token = _planned.set(name)
    try:
        yield
    finally:
        _planned.reset(token)
