"""The compiled train program: model, optimizer, abstract sharded state, AOT-compiled step.

Training and the scale planner build the step through the same function, so what the
planner measures (memory, FLOPs, collectives) is the program that trains.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from jumprelu.core import kinds, sae
from jumprelu.train import optim, sharding
from jumprelu.train import state as state_lib
from jumprelu.train.step import make_stacked_train_step, make_train_step


@dataclasses.dataclass
class Program:
    model: sae.SAEBase
    kind: kinds.Kind
    tx: object
    mesh: Mesh
    abstract_state: state_lib.TrainState  # ShapeDtypeStructs with NamedShardings
    batch_sharding: NamedSharding
    step: jax.stages.Compiled  # (state, batch [B, d]) -> (state, metrics); state donated
    # K stacked SAEs (config `stack`): their λ values; empty for one SAE. Metrics then have a K axis.
    sparsity_coefficients: tuple[float, ...] = ()
    step_path: str = "dense"  # which step was compiled and why (sae.sparse), for the log

    @property
    def members(self) -> int:
        return len(self.sparsity_coefficients)


def build(cfg, d_model: int, mesh: Mesh, batch_dtype: str = "float32") -> Program:
    """Checks the layout against the mesh, then lowers and compiles the step once.

    batch_dtype: the dtype batches arrive in (a bfloat16 store's rows go to the device as
    bfloat16, halving the transfer; the step widens them to float32).
    """
    sharding.check_width(mesh, cfg.sae.width)
    sharding.check_batch(mesh, cfg.train.batch_size)
    lams = tuple(float(v) for v in cfg.stack.sparsity_coefficients)
    sae_cfg = cfg.sae
    if lams and sae_cfg.get("sparse") == "auto":
        # vmapped members turn the sparse step's per-batch overflow branch (lax.cond) into a
        # select that runs both paths, so `auto` keeps stacked SAEs on the dense step.
        sae_cfg = sae_cfg.copy_and_resolve_references()
        sae_cfg.sparse = "off"
    kind = kinds.from_config(sae_cfg, d_model, cfg.train.steps)
    model = kind.model
    tx = optim.make_optimizer(cfg.train)
    abstract = state_lib.with_shardings(
        mesh, state_lib.abstract_state(model, tx, kind.init_stats, members=len(lams)), stacked=bool(lams)
    )
    batch_sharding = sharding.batch_sharding(mesh)
    lr = optim.learning_rate_schedule(cfg.train)
    skip = bool(cfg.train.get("skip_nonfinite_batches", False))
    if lams:
        unit = optim.sparsity_schedule(cfg.train, 1.0)
        step_fn = make_stacked_train_step(model, tx, unit, lr, lams, kind.loss, skip_nonfinite=skip)
    else:
        lam = optim.sparsity_schedule(cfg.train, cfg.sae.sparsity_coefficient)
        step_fn = make_train_step(model, tx, lam, lr, kind.loss, skip_nonfinite=skip)
    state_shardings = jax.tree.map(lambda a: a.sharding, abstract)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, d_model), jnp.dtype(batch_dtype), sharding=batch_sharding)
    with jax.set_mesh(mesh):
        compiled = (
            jax.jit(
                step_fn,
                in_shardings=(state_shardings, batch_sharding),
                out_shardings=(state_shardings, NamedSharding(mesh, sharding.REPLICATED)),
                donate_argnums=0,
            )
            .lower(abstract, batch)
            .compile()
        )
    path = kind.step_path if sae_cfg is cfg.sae else "auto: dense (stacked SAEs)"
    return Program(model, kind, tx, mesh, abstract, batch_sharding, compiled, lams, path)
