"""The train state, built abstractly and created directly with its shardings."""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jumprelu.train import distributed, sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: dict  # SAE parameters, normalised units, float32
    opt_state: optax.OptState
    scale: jax.Array  # float32 scalar C: the model sees x / C
    # int32: batches dropped for a non-finite loss or update (train.skip_nonfinite_batches; see guard.py)
    skipped: jax.Array
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
        skipped=jnp.zeros((), jnp.int32),
        stats=init_stats(),
    )


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, init_stats=dict, members: int = 0) -> TrainState:
    """Shapes and dtypes only (no shardings attached); members > 0 for K stacked SAEs."""

    def make(k):
        s = init_state(model, tx, k, 1.0, init_stats)
        return stack(s, members) if members else s

    return jax.eval_shape(make, jax.random.key(0))


# K stacked SAEs (config `stack`): params, optimizer state, stats and the skipped-batch count
# gain a leading axis of size K; the step counter and the input scale C are shared. This is
# the vmap axis spec.
STACK_AXES = TrainState(step=None, params=0, opt_state=0, scale=None, skipped=0, stats=0)


def stack(state: TrainState, members: int) -> TrainState:
    """K copies of one state along a new leading axis (every member starts from the same init)."""
    rep = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (members, *jnp.shape(a))), t)  # noqa: E731
    return state.replace(
        params=rep(state.params), opt_state=rep(state.opt_state), stats=rep(state.stats), skipped=rep(state.skipped)
    )


def member_of(tree, i: int):
    """Member i of a stacked tree (params or stats of K stacked SAEs): each leaf's slice [i]."""
    return jax.tree.map(lambda a: a[i], tree)


def with_shardings(mesh: Mesh, abstract, stacked: bool = False):
    """Attaches the table's NamedShardings to an abstract tree (for restore and AOT compile)."""
    shardings = sharding.tree_shardings(mesh, abstract, stacked)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def create_state(model, tx, mesh: Mesh, key: jax.Array, scale: float, init_stats=dict, members: int = 0) -> TrainState:
    """Creates the state already sharded: never built on one device and then moved.

    members > 0: K stacked copies of the same initial state (a λ sweep from one init, as K
    separate runs with the same seed would start).
    """

    def make(k, c):
        s = init_state(model, tx, k, c, init_stats)
        return stack(s, members) if members else s

    abstract = jax.eval_shape(make, key, jnp.float32(scale))
    shardings = sharding.tree_shardings(mesh, abstract, stacked=bool(members))
    with jax.set_mesh(mesh):
        return jax.jit(make, out_shardings=shardings)(key, scale)


def start_from_data(state: TrainState, spec, sae_cfg, rows, members: int = 0, held_out=None) -> TrainState:
    """The kind's data-dependent start (b_dec, θ, bandwidth scale from `rows` [N, d] raw; rows held
    out from training where the kind reads them), applied to a fresh state: computed on the host
    from member 0's params (stacked members share one init, as they do without it) and put back
    with the state's own shardings."""
    import numpy as np

    host = distributed.to_host((state.params, state.stats))  # params split across hosts too
    params, stats = (member_of(t, 0) for t in host) if members else host
    x = np.asarray(rows, np.float32) / float(state.scale)
    if held_out is None:
        params, stats = spec.init_from_data(params, stats, x, sae_cfg)
    else:
        held = np.asarray(held_out, np.float32) / float(state.scale)
        params, stats = spec.init_from_data(params, stats, x, sae_cfg, held_out=held)
    if members:
        params, stats = (
            jax.tree.map(lambda a: np.broadcast_to(a, (members, *np.shape(a))), t) for t in (params, stats)
        )
    put = lambda new, old: jax.device_put(jnp.asarray(new, old.dtype), old.sharding)  # noqa: E731
    return state.replace(params=jax.tree.map(put, params, state.params), stats=jax.tree.map(put, stats, state.stats))
