"""Meshes and the shardings of every state tree, derived from the one layout declaration.

Mesh axes are ('data', 'model'); the PartitionSpec of each named array comes from
`jumprelu.core.layout` (shared arrays) and the SAE kinds' declarations (their own arrays).
Optimizer state mirrors the parameter it belongs to; scalars are replicated; a non-scalar
array whose name nothing declares is an error (it would otherwise be silently replicated
on every device).
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jumprelu.core import kinds
from jumprelu.core.layout import AXES, BATCH_SPEC, REPLICATED
from jumprelu.errors import ConfigError


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int]:
    """Resolves -1 ('fill the remaining devices') and checks the product fits."""
    data, model = mesh_cfg.data, mesh_cfg.model
    if data == -1 and model == -1:
        raise ConfigError("config fields mesh.data and mesh.model cannot both be -1")
    if data == -1:
        data = max(num_devices // model, 1)
    if model == -1:
        model = max(num_devices // data, 1)
    if data * model > num_devices:
        raise ConfigError(
            f"config fields mesh.data × mesh.model = {data}×{model} = {data * model} "
            f"exceeds the {num_devices} available devices"
        )
    return data, model


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    data, model = mesh_shape(mesh_cfg, len(devices))
    if jax.process_count() > 1 and data * model != len(devices):
        # the mesh would take the first devices (process 0's): the others would hold no part of the
        # state, crash fetching it and leave process 0 waiting minutes at the shutdown barrier
        raise ConfigError(
            f"config fields mesh.data × mesh.model = {data}×{model} = {data * model} use only some of the "
            f"{len(devices)} devices of this {jax.process_count()}-process run; a multi-host mesh must use them "
            "all: set mesh.data=-1 or mesh.model=-1 (or a product of the device count)"
        )
    # Auto axes: the compiler propagates shardings from the declared in/out specs and
    # the latent constraint in the step; explicit types are spelled out because the
    # default changed to Explicit in jax 0.9.
    return jax.make_mesh(
        (data, model), AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices[: data * model]
    )


def check_width(mesh: Mesh, width: int) -> None:
    n = mesh.shape["model"]
    if width % n:
        raise ConfigError(f"config field sae.width={width} is not divisible by mesh.model={n}")


def check_batch(mesh: Mesh, batch_size: int) -> None:
    n = mesh.shape["data"]
    if batch_size % n:
        raise ConfigError(f"config field train.batch_size={batch_size} is not divisible by mesh.data={n}")


def _spec_for_path(path, leaf, specs: dict, stacked: bool = False) -> P:
    """The spec of a state leaf: that of the last declared array name on its path.

    stacked: leaves carry a leading axis of K stacked SAEs, which is not split (each device
    holds its slice of every SAE, so the K SAEs share the batch's layout).
    """
    extra = 1 if stacked else 0
    ndim = getattr(leaf, "ndim", 0)
    for entry in reversed(path):
        name = getattr(entry, "key", None)
        if name in specs and len(specs[name]) + extra <= ndim:  # a spec may leave trailing axes whole
            return P(*([None] * extra), *specs[name])
    if ndim <= extra:  # scalars (step, Adam's count, controller state) are replicated
        return REPLICATED
    raise ValueError(
        f"state array {jax.tree_util.keystr(path)} of shape {list(leaf.shape)} has no declared sharding: "
        "declare it in its SAE kind's param_specs (jumprelu/core/kinds/)"
    )


def tree_specs(tree, stacked: bool = False):
    """PartitionSpecs for any tree of params or state (params, Adam mu/nu, ...)."""
    specs = kinds.array_specs()
    return jax.tree_util.tree_map_with_path(lambda p, leaf: _spec_for_path(p, leaf, specs, stacked), tree)


def tree_shardings(mesh: Mesh, tree, stacked: bool = False):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), tree_specs(tree, stacked))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH_SPEC)
