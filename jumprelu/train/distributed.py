"""Multi-host runs: initialisation, which process leads, and per-process batch slices.

On a TPU pod slice every host runs the same command. Each process reads only the rows
of the global batch that its devices hold, and `jax.make_array_from_process_local_data` assembles the
global [B, d] array with the batch sharding. Only process 0 writes logs, metrics and
reports; checkpoints are written collectively by orbax (every process calls save).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from jumprelu.errors import ConfigError

ENV_SWITCH = "JUMPRELU_DISTRIBUTED"


def maybe_initialize(mesh_cfg) -> None:
    """`jax.distributed.initialize()` when `mesh.distributed` or $JUMPRELU_DISTRIBUTED=1.

    Must run before anything touches a JAX device. On Cloud TPU (and SLURM, ...) the
    coordinator, process count and index are discovered; elsewhere set
    $JUMPRELU_COORDINATOR (host:port), $JUMPRELU_NUM_PROCESSES and $JUMPRELU_PROCESS_ID.
    """
    if not (mesh_cfg.get("distributed", False) or os.environ.get(ENV_SWITCH, "") == "1"):
        return
    explicit = {
        "coordinator_address": os.environ.get("JUMPRELU_COORDINATOR"),
        "num_processes": os.environ.get("JUMPRELU_NUM_PROCESSES"),
        "process_id": os.environ.get("JUMPRELU_PROCESS_ID"),
    }
    if all(v is not None for v in explicit.values()):
        explicit["num_processes"] = int(explicit["num_processes"])
        explicit["process_id"] = int(explicit["process_id"])
        jax.distributed.initialize(**explicit)
        return
    try:
        jax.distributed.initialize()  # finds the cluster itself: a Cloud TPU slice, SLURM, ...
    except ValueError as e:  # e.g. "coordinator_address should be defined": no cluster found
        raise ConfigError(
            "config field mesh.distributed is True (or JUMPRELU_DISTRIBUTED=1) but JAX found no cluster to "
            f"join ({e}); on one machine leave it off, elsewhere set JUMPRELU_COORDINATOR, "
            "JUMPRELU_NUM_PROCESSES and JUMPRELU_PROCESS_ID"
        ) from None


def is_lead() -> bool:
    return jax.process_index() == 0


def process_rows(batch_sharding, batch_size: int, d_model: int) -> slice:
    """The rows of the global batch that this process's devices hold under the sharding.

    With the batch split over 'data' these are this process's share; where a process's
    devices all sit on one 'data' index (e.g. a model-parallel mesh spanning hosts) a
    process holds, and so must read, the whole batch.
    """
    index = batch_sharding.addressable_devices_indices_map((batch_size, d_model)).values()
    rows = [idx[0].indices(batch_size) for idx in index]
    return slice(min(r[0] for r in rows), max(r[1] for r in rows))


def global_batch(local_rows: np.ndarray, sharding, batch_size: int) -> jax.Array:
    """Assembles the global [B, d] batch from every process's local rows."""
    return jax.make_array_from_process_local_data(sharding, local_rows, (batch_size, local_rows.shape[1]))


def to_host(tree):
    """Fully materialises a (possibly multi-host sharded) tree as numpy on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
