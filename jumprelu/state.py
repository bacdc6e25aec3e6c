"""The train state, built abstractly and created directly with its shardings."""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jumprelu import sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: dict  # SAE parameters, normalised units, float32
    opt_state: optax.OptState
    scale: jax.Array  # float32 scalar C: the model sees x / C
    stats: dict = flax.struct.field(default_factory=dict)  # the kind's non-gradient state (kinds/__init__.py)


def init_state(
    model: nn.Module, tx: optax.GradientTransformation, key: jax.Array, scale, init_stats=dict
) -> TrainState:
    """Pure initialisation (jit it with out_shardings to create it sharded)."""
    x = jnp.zeros((1, model.d_model), jnp.float32)
    params = model.init(key, x)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        scale=jnp.asarray(scale, jnp.float32),
        stats=init_stats(),
    )


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, init_stats=dict) -> TrainState:
    """Shapes and dtypes only (no shardings attached)."""
    return jax.eval_shape(lambda k: init_state(model, tx, k, 1.0, init_stats), jax.random.key(0))


def with_shardings(mesh: Mesh, abstract):
    """Attaches the table's NamedShardings to an abstract tree (for restore and AOT compile)."""
    shardings = sharding.tree_shardings(mesh, abstract)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def create_state(model, tx, mesh: Mesh, key: jax.Array, scale: float, init_stats=dict) -> TrainState:
    """Creates the state already sharded: never built on one device and then moved."""
    shardings = sharding.tree_shardings(mesh, abstract_state(model, tx, init_stats))
    with jax.set_mesh(mesh):
        return jax.jit(lambda k, c: init_state(model, tx, k, c, init_stats), out_shardings=shardings)(key, scale)
