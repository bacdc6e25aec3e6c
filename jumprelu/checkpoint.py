"""Orbax checkpoints of the whole train state, in named items.

A checkpoint directory `WORKDIR/checkpoints/<step>/` holds:
  sae     {"params", "scale": C, "stats"} -- all a user needs (`jumprelu.load` reads only this)
  train   {"step": ..., "opt_state": ...}
  config  the resolved experiment config as JSON (with data.d_model filled in)
  data    the data pipeline's iterator state, one JSON file per process (Grain's handler)
Orbax writes each step to a temporary directory and renames it when complete, so a
crash at any moment leaves the previous checkpoint loadable. Restores always go into
an abstract target with shardings attached: restoring without one would return the
saved shardings and turn optax's namedtuples into lists.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from jumprelu.state import TrainState

ITEMS = ("sae", "train", "config", "data")


def checkpoint_dir(workdir: str) -> str:
    if "://" in workdir:
        return workdir.rstrip("/") + "/checkpoints"
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
    def __init__(self, workdir: str, keep: int, read_only: bool = False):
        self.directory = checkpoint_dir(workdir)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: TrainState, config: dict, data_iterator) -> None:
        """Starts an asynchronous save of `state` at its own step.

        data_iterator: an object whose `get_state()` gives the pipeline's state as JSON bytes
        (see `pipeline.IteratorSnapshot`).
        """
        args = ocp.args.Composite(
            sae=ocp.args.StandardSave({"params": state.params, "scale": state.scale, "stats": state.stats}),
            train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
            config=ocp.args.JsonSave(config),
            data=grain.checkpoint.CheckpointSave(data_iterator),
        )
        self._manager.save(int(state.step), args=args)

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def restore_state(self, abstract: TrainState, step: int | None = None) -> TrainState:
        """Restores into `abstract` (ShapeDtypeStructs with shardings)."""
        step = self.latest_step() if step is None else step
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                sae=ocp.args.StandardRestore(
                    {"params": abstract.params, "scale": abstract.scale, "stats": abstract.stats}
                ),
                train=ocp.args.StandardRestore({"step": abstract.step, "opt_state": abstract.opt_state}),
            ),
        )
        sae, train = restored["sae"], restored["train"]
        return TrainState(
            step=train["step"],
            params=sae["params"],
            opt_state=train["opt_state"],
            scale=sae["scale"],
            stats=sae["stats"],
        )

    def restore_data(self, iterator, step: int | None = None) -> bool:
        """Sets `iterator` to the pipeline state saved at `step`; False if this process has none
        (the checkpoint came from a run with another process count)."""
        step = self.latest_step() if step is None else step
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not (epath.Path(self.directory) / str(step) / "data" / name).exists():
            return False
        self._manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator)))
        return True

    def restore_sae(self, abstract_params, abstract_scale, abstract_stats=None, step: int | None = None):
        """Only the `sae` item, without the optimizer state: (params, scale, stats)."""
        step = self.latest_step() if step is None else step
        target = {"params": abstract_params, "scale": abstract_scale, "stats": abstract_stats or {}}
        out = self._manager.restore(step, args=ocp.args.Composite(sae=ocp.args.StandardRestore(target)))["sae"]
        return out["params"], out["scale"], out["stats"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
