"""Multi-host runs: initialisation, which process leads, and per-process batch slices.

On a TPU pod slice every host runs the same command. Each process reads only its own
rows of the global batch, and `jax.make_array_from_process_local_data` assembles the
global [B, d] array with the batch sharding. Only process 0 writes logs, metrics and
reports; checkpoints are written collectively by orbax (every process calls save).
"""

from __future__ import annotations

import os

import jax
import numpy as np

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
    else:
        jax.distributed.initialize()


def is_lead() -> bool:
    return jax.process_index() == 0


def process_rows(batch_size: int) -> slice:
    """This process's share of the global batch rows (contiguous, equal for all)."""
    n, i = jax.process_count(), jax.process_index()
    per = batch_size // n
    return slice(i * per, (i + 1) * per)


def global_batch(local_rows: np.ndarray, sharding, batch_size: int) -> jax.Array:
    """Assembles the global [B, d] batch from every process's local rows."""
    return jax.make_array_from_process_local_data(sharding, local_rows, (batch_size, local_rows.shape[1]))


def to_host(tree):
    """Fully materialises a (possibly multi-host sharded) tree as numpy on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
