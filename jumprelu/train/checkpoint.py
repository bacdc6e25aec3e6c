"""Orbax checkpoints of the whole train state, in named items.

A checkpoint directory `WORKDIR/checkpoints/<step>/` holds:
  sae     {"params", "scale": C, "stats"} -- all a user needs (`jumprelu.load` reads only this)
  train   {"step": ..., "opt_state": ...}
  config  the resolved experiment config as JSON (with data.d_model filled in)
  data    the data pipeline's iterator state, one JSON file per process (Grain's handler)
With K stacked SAEs (config `stack`), `sae` is replaced by one item per member, `sae-0` ...
`sae-{K-1}`, each exactly what a single run's `sae` item holds, so `jumprelu.load` reads one
member without touching the others; `train` keeps the stacked optimizer state.
Orbax writes each step to a temporary directory and renames it when complete, so a
crash at any moment leaves the previous checkpoint loadable. Restores always go into
an abstract target with shardings attached: restoring without one would return the
saved shardings and turn optax's namedtuples into lists.

A save that fails (a full disk), now or in orbax's background thread, is one line naming
the step and the last complete checkpoint. A checkpoint that cannot be read back is set
aside into `checkpoints-damaged/` by a resuming run (`resume.py`); nothing is deleted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jumprelu import fs
from jumprelu.errors import CheckpointError
from jumprelu.train.failures import no_space, reason
from jumprelu.train.state import TrainState, member_of

log = logging.getLogger("jumprelu")

ITEMS = ("sae", "train", "config", "data")
SKIPPED = "skipped_batches"  # in the train item since skip_nonfinite_batches; older checkpoints lack it


MEMBER_FILE = "member.json"  # in WORKDIR/sae-i/ of a stacked run: {"member": i, "workdir": ".."}


def member_item(i: int) -> str:
    """Member i's checkpoint item, and the name of its directory in the workdir."""
    return f"sae-{i}"


def member_dir(workdir: str, i: int) -> str:
    """WORKDIR/sae-i: member i's metrics, report, config and load path."""
    return fs.join(workdir, member_item(i))


def _unstacked(abstract):
    """The abstract of one member: the leading K axis (never split, see sharding) dropped."""

    def one(a):
        spec = a.sharding.spec
        return jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=NamedSharding(a.sharding.mesh, P(*spec[1:])))

    return jax.tree.map(one, abstract)


def checkpoint_dir(workdir: str) -> str:
    if "://" in workdir:
        return workdir.rstrip("/") + "/checkpoints"
    return os.path.join(os.path.abspath(workdir), "checkpoints")


@contextlib.contextmanager
def _without_read_only_notice():
    """orbax logs a warning ("Given directory is read only") for every reader it opens: for
    `jumprelu.load` and `evaluate` that is the expected case, not something to warn about."""
    logger = logging.getLogger("absl")

    def keep(record) -> bool:
        return not str(record.msg).startswith("Given directory is read only")

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


class Checkpointer:
    def __init__(self, workdir: str, keep: int, read_only: bool = False, members: int = 0):
        self.directory = checkpoint_dir(workdir)
        self.members = members
        sae_items = tuple(member_item(i) for i in range(members)) if members else ("sae",)
        if read_only:  # orbax would warn that it overrides these for a reader: say them ourselves
            options = ocp.CheckpointManagerOptions(
                max_to_keep=None, save_interval_steps=0, create=False, read_only=True
            )
        else:
            # A save killed mid-write leaves its `<step>.orbax-checkpoint-tmp-<time>` folder, never
            # read and never reused (the next save of that step gets another name): the writer, which
            # holds the workdir lock, removes them when it opens
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
        with _without_read_only_notice():
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=sae_items + ITEMS[1:])
        self._in_flight: int | None = None

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        """Complete checkpoints, newest first."""
        return sorted(self._manager.all_steps(), reverse=True)

    def reload(self) -> None:
        """Re-reads the list of steps (after another process moved one)."""
        self._manager.reload()

    def step_dir(self, step: int) -> str:
        return fs.join(self.directory, str(step))

    def _write_failed(self, step: int, error: BaseException) -> CheckpointError:
        latest = self.latest_step()
        last = f"the last complete checkpoint is {self.step_dir(latest)}" if latest is not None else "none is complete"
        why = reason(error)
        hint = ""
        if no_space(error):
            hint = "; free some space and run the same command again: it resumes from there"
        return CheckpointError(f"cannot write checkpoint {step} in {self.directory}: {why}; {last}{hint}")

    def save(self, state: TrainState, config: dict, data_iterator) -> None:
        """Starts an asynchronous save of `state` at its own step.

        data_iterator: an object whose `get_state()` gives the pipeline's state as JSON bytes
        (see `pipeline.IteratorSnapshot`).
        """
        if self.members:
            sae = {}
            for i in range(self.members):
                params, stats = member_of((state.params, state.stats), i)
                sae[member_item(i)] = ocp.args.StandardSave({"params": params, "scale": state.scale, "stats": stats})
        else:
            sae = {"sae": ocp.args.StandardSave({"params": state.params, "scale": state.scale, "stats": state.stats})}
        args = ocp.args.Composite(
            **sae,
            train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state, SKIPPED: state.skipped}),
            config=ocp.args.JsonSave(config),
            data=grain.checkpoint.CheckpointSave(data_iterator),
        )
        step = int(state.step)
        # orbax waits for the previous save before starting this one anyway; waiting here first
        # makes a failure of that background save name its own step.
        self.wait()
        try:
            self._manager.save(step, args=args)
        except Exception as e:
            raise self._write_failed(step, e) from None
        self._in_flight = step

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def restore_state(self, abstract: TrainState, step: int | None = None) -> TrainState:
        """Restores into `abstract` (ShapeDtypeStructs with shardings)."""
        step = self.latest_step() if step is None else step
        target = {"params": abstract.params, "scale": abstract.scale, "stats": abstract.stats}
        if self.members:
            one = {"params": _unstacked(abstract.params), "scale": abstract.scale, "stats": _unstacked(abstract.stats)}
            sae = {member_item(i): ocp.args.StandardRestore(one) for i in range(self.members)}
        else:
            sae = {"sae": ocp.args.StandardRestore(target)}
        train_target = {"step": abstract.step, "opt_state": abstract.opt_state}
        has_skipped = self._has_skipped(step)
        if has_skipped:
            train_target[SKIPPED] = abstract.skipped
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**sae, train=ocp.args.StandardRestore(train_target))
        )
        train = restored["train"]
        if not has_skipped:
            a = abstract.skipped
            train[SKIPPED] = jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding)
        if self.members:
            parts = [restored[member_item(i)] for i in range(self.members)]
            shardings = jax.tree.map(lambda a: a.sharding, (abstract.params, abstract.stats))
            params, stats = jax.jit(lambda ps: jax.tree.map(lambda *xs: jnp.stack(xs), *ps), out_shardings=shardings)(
                [(p["params"], p["stats"]) for p in parts]
            )
            sae = {"params": params, "stats": stats, "scale": parts[0]["scale"]}
        else:
            sae = restored["sae"]
        return TrainState(
            step=train["step"],
            params=sae["params"],
            opt_state=train["opt_state"],
            scale=sae["scale"],
            skipped=train[SKIPPED],
            stats=sae["stats"],
        )

    def _has_skipped(self, step: int) -> bool:
        meta = epath.Path(self.directory) / str(step) / "train" / "_METADATA"
        tree = json.loads(meta.read_text()).get("tree_metadata", {})
        return any(key.startswith(f"('{SKIPPED}'") for key in tree)

    def check_data(self, step: int) -> None:
        """Reads this process's data item of `step` (if it has one): raises if it is unreadable."""
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        file = epath.Path(self.directory) / str(step) / "data" / name
        if file.exists():
            state = json.loads(file.read_text())
            if not isinstance(state, dict) or "next_index" not in state:
                raise ValueError(f"{file} holds no pipeline state")
            at = state["next_index"]  # the batch the run goes on with: the step's own number
            if isinstance(at, bool) or not isinstance(at, int) or at != step:
                raise ValueError(f"{file} holds the data position {at!r}, not this step's {step}")

    def set_aside(self, step: int) -> str:
        """Moves checkpoint `step` to checkpoints-damaged/ (never deleted); returns where it went."""
        aside = self.directory.rstrip("/") + "-damaged"
        fs.makedirs(aside)
        dst, n = fs.join(aside, str(step)), 1
        while fs.exists(dst):
            dst, n = fs.join(aside, f"{step}.{n}"), n + 1
        fs.rename(self.step_dir(step), dst)
        self._manager.reload()
        return dst

    def restore_data(self, iterator, step: int | None = None) -> bool:
        """Sets `iterator` to the pipeline state saved at `step`; False if this process has none
        (the checkpoint came from a run with another process count)."""
        step = self.latest_step() if step is None else step
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not (epath.Path(self.directory) / str(step) / "data" / name).exists():
            return False
        self._manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator)))
        return True

    def restore_sae(
        self, abstract_params, abstract_scale, abstract_stats=None, step: int | None = None, member: int | None = None
    ):
        """Only the `sae` item (or member `member`'s), without the optimizer state: (params, scale, stats)."""
        step = self.latest_step() if step is None else step
        target = {"params": abstract_params, "scale": abstract_scale, "stats": abstract_stats or {}}
        item = "sae" if member is None else member_item(member)
        args = ocp.args.Composite(**{item: ocp.args.StandardRestore(target)})
        out = self._manager.restore(step, args=args)[item]
        return out["params"], out["scale"], out["stats"]

    def wait(self) -> None:
        """Waits for the in-flight save; its failure is a one-line `CheckpointError`."""
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:
            step, self._in_flight = self._in_flight, None
            raise self._write_failed(step if step is not None else -1, e) from None
        self._in_flight = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()
