"""Resuming: is the saved run the same run, and which checkpoint is the newest intact one.

A resumed run must see exactly the rows the unbroken run would have seen at each step, so
every field that fixes shapes or which rows a step reads must match the checkpoint's
config (`RESUME_FIELDS`); anything else (learning rate, λ warm-up, steps, logging) may
change on resume, which is how a diverged run is continued with a lower `train.lr`.

A checkpoint whose config, state or data position cannot be read back, or whose state is
not finite (saved by a jumprelu without the divergence guard), is damaged: the resuming run
says which and why, moves it to `checkpoints-damaged/`, and falls back to the next older.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections
import numpy as np

from jumprelu.config import CONTROLLER_PARTS
from jumprelu.config_shape import flat_fields
from jumprelu.core.kinds.ownership import JUMPRELU_ONLY
from jumprelu.errors import CheckpointError, ConfigError
from jumprelu.train import distributed, guard
from jumprelu.train.checkpoint import Checkpointer
from jumprelu.train.failures import reason

log = logging.getLogger("jumprelu")

RESUME_FIELDS = (
    # first: another store changes d_model too, and the field the user changed is the one to name
    "data.source",
    # shapes and meaning of the saved arrays
    "sae.kind",
    "sae.width",
    "sae.threshold_param",
    "sae.pre_encoder_bias",
    "data.d_model",
    "stack.sparsity_coefficients",
    # which rows global batch k holds (data/stream.py), and which rows are held out
    "train.batch_size",
    "data.synthetic",
    "data.seed",
    "data.eval_rows",
    "data.block_bytes",
    "data.nonfinite",
    # the input scale C is chosen once, at step 0, and saved with the state
    "data.normalize",
)
# With data.source "lm" also: which texts, model and site make the rows, and how they are shuffled.
LM_RESUME_FIELDS = ("data.lm", "data.shuffle_buffer_rows")


# Options whose being on or off adds or removes arrays of the saved state (optimizer transforms,
# kind statistics): their values may change on resume, switching them may not, or every
# checkpoint would fail to restore and be set aside as damaged.
STATE_SWITCHES = (
    ("train.clip_grad_norm", bool),
    ("train.encoder_weight_decay", bool),
    ("train.adam_update_clip", bool),
    ("sae.target_l0", lambda v: v is not None),
    ("sae.bandwidth_mode", lambda v: v == "relative"),
    ("sae.pre_act_coefficient", bool),
    ("sae.batchtopk_fraction", bool),
    ("sae.target_l0_held_out_rows", lambda v: v or 0),  # the count is an array's shape
)


def _get(d: dict, dotted: str):
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return json.loads(json.dumps(d))  # tuples and lists compare alike, as they are in the saved JSON


def _same_store(saved: dict, now: dict) -> bool:
    """A store named by another spelling of its path (relative then absolute, or through a
    link) is the same store: compared by the absolute path training recorded (`trained_on.path`);
    so is a store that moved, when its metadata gives the fingerprint of the rows the run recorded
    (`trained_on.rows`: its row count and its blocks' checksums)."""
    from jumprelu.data import LM_SOURCE, metadata_fingerprint, recorded_source
    from jumprelu.store.metadata import read_metadata

    was, is_ = str(saved["data"]["source"]), str(now["data"]["source"])
    if was == is_:
        return True
    if {was, is_} & {"synthetic", LM_SOURCE} or "://" in was or "://" in is_:
        return False
    if os.path.realpath(recorded_source(saved)) == os.path.realpath(is_):
        return True
    rows = (saved.get("trained_on") or {}).get("rows")
    try:
        return rows is not None and os.path.isdir(is_) and metadata_fingerprint(read_metadata(is_)) == rows
    except Exception:  # not a readable store: not the same one (opening it says why)
        return False


def check_resumable(saved: dict, cfg: ml_collections.ConfigDict, directory: str) -> None:
    now = cfg.to_dict()
    fields = RESUME_FIELDS + (LM_RESUME_FIELDS if cfg.data.source == "lm" else ())
    for field in fields:
        if field == "data.source" and _same_store(saved, now):
            continue
        if _get(saved, field) != _get(now, field):
            raise ConfigError(
                f"config field {field} is {_get(now, field)!r} but the checkpoint in {directory} "
                f"was trained with {_get(saved, field)!r}; set it back or use a new --workdir"
            )
    rows_was, rows_now = _get(saved, "trained_on.rows"), _get(now, "trained_on.rows")
    if rows_was is not None and rows_now is not None and rows_was != rows_now:  # same path, rewritten store
        raise ConfigError(
            f"store {cfg.data.source} holds other rows ({rows_now}) than the checkpoint in {directory} was "
            f"trained on ({rows_was}): it was rewritten since; resume on that store or use a new --workdir"
        )
    scale_now, scale_was = _get(now, "data.scale"), _get(saved, "data.scale")
    if scale_now is not None and scale_now != scale_was:  # unset: the checkpoint's C, as trained
        raise ConfigError(
            f"config field data.scale is {scale_now!r} but the checkpoint in {directory} was trained with "
            f"{scale_was!r} (None: the store's C); the input scale is fixed at step 0: unset it or use a new --workdir"
        )
    for field, on in STATE_SWITCHES:
        if cfg.sae.kind != "jumprelu" and field.removeprefix("sae.") in JUMPRELU_ONLY:
            continue  # another kind's state has none of these options' arrays (older runs saved them, unread)
        if (
            field.removeprefix("sae.") in CONTROLLER_PARTS
            and _get(saved, "sae.target_l0") is None
            and _get(now, "sae.target_l0") is None
        ):
            continue  # neither run has a controller, so neither has these arrays
        was, now_value = _get(saved, field), _get(now, field)
        if on(was) != on(now_value):
            change = "changing it" if on(was) and on(now_value) else f"switching it {'on' if on(now_value) else 'off'}"
            raise ConfigError(
                f"config field {field} is {now_value!r} but the checkpoint in {directory} was trained with "
                f"{was!r}: {change} changes the saved state; set it back or use a new --workdir"
            )


def _agree(ok: bool) -> bool:
    """Every process restores the same step: a step is intact only if it is intact on all of them."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _set_aside(ckpt: Checkpointer, step: int, why: str) -> None:
    """Process 0 moves the checkpoint; every process then re-reads the steps (or raises with it)."""
    error = None
    if distributed.is_lead():
        try:
            where = ckpt.set_aside(step)
            log.warning("checkpoint %s is damaged (%s): skipped it and moved it to %s", ckpt.step_dir(step), why, where)
        except Exception as e:
            error = reason(e)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        moved = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))  # also the barrier
        error = error or (None if moved else "see process 0")
        ckpt.reload()
    if error is not None:
        raise CheckpointError(
            f"checkpoint {ckpt.step_dir(step)} is damaged ({why}) and could not be moved aside ({error}); "
            "move it out of the checkpoints directory by hand and run again"
        )


def check_latest_config(ckpt: Checkpointer, cfg) -> None:
    """Before compiling: the newest checkpoint whose config reads back must be of the same run."""
    for step in ckpt.steps():
        try:
            saved = ckpt.restore_config(step)
        except Exception:  # damaged: restore_intact says so and sets it aside
            continue
        check_resumable(saved, cfg, ckpt.directory)
        if step > cfg.train.steps:  # else the data pipeline fails deep inside (or an LM run does nothing)
            raise ConfigError(
                f"config field train.steps is {cfg.train.steps}, but the workdir's newest checkpoint "
                f"{ckpt.directory}/{step} is past it: resume with train.steps >= {step}, or use a new workdir"
            )
        _check_hand_over(saved, cfg, step, ckpt.directory)
        _check_changes(saved, cfg, step, ckpt.directory)
        return


# what a resume may change (lr, λ, warm-ups...) but should say it changed; train.steps is how a run is extended
CHANGEABLE_SECTIONS = ("sae", "train")


def _check_changes(saved: dict, cfg, step: int, directory: str) -> None:
    """A finished run given other settings would train nothing and report the old SAE as theirs
    (and config.json would claim them): refused. A run resumed part-way with other settings (a lower
    lr after a divergence) goes on, saying which fields changed."""

    def fields(config: dict) -> dict:  # tuples and lists compare alike, as they are in the saved JSON
        return flat_fields(json.loads(json.dumps({s: config.get(s) or {} for s in CHANGEABLE_SECTIONS})))

    was, is_ = fields(saved), fields(cfg.to_dict())
    changed = [k for k in sorted(was.keys() | is_.keys()) if k != "train.steps" and was.get(k) != is_.get(k)]
    if not changed:
        return
    listed = ", ".join(f"{k} {was.get(k)!r} -> {is_.get(k)!r}" for k in changed[:4]) + (
        f" and {len(changed) - 4} more" if len(changed) > 4 else ""
    )
    if step >= cfg.train.steps:
        raise ConfigError(
            f"the workdir's checkpoint {directory}/{step} is this run's last step (train.steps={cfg.train.steps}), "
            f"trained with other settings ({listed}): nothing would train with them; use a new --workdir, or a "
            "larger train.steps to go on training with them"
        )
    log.warning("resuming from %s/%d with changed settings, applied from this step on: %s", directory, step, listed)


def _check_hand_over(saved: dict, cfg, step: int, directory: str) -> None:
    """A run past its BatchTopK phase must not re-enter it: the phase is a share of train.steps,
    so training further (a larger train.steps) would move the hand-over past the resumed step."""
    from jumprelu.core.kinds.jumprelu_options import batchtopk_steps

    def end(s: dict, steps: int) -> int:
        return batchtopk_steps(s, steps) if s.get("kind", "jumprelu") == "jumprelu" else 0

    was = end(saved.get("sae") or {}, int(_get(saved, "train.steps") or 0))
    now = end(cfg.sae.to_dict(), cfg.train.steps)
    if was and was <= step < now:
        raise ConfigError(
            f"config field train.steps is {cfg.train.steps}: the checkpoint {directory}/{step} handed over from "
            f"the BatchTopK phase at step {was}, and sae.batchtopk_fraction={cfg.sae.batchtopk_fraction} of "
            f"{cfg.train.steps} steps would take it back into the phase until step {now}; set "
            f"sae.batchtopk_fraction={was / cfg.train.steps:.6g} to keep the hand-over at step {was}"
        )


def restore_intact(ckpt: Checkpointer, cfg, abstract_state):
    """The state of the newest intact checkpoint (damaged newer ones set aside), or None if there is none."""
    damaged = []
    for step in ckpt.steps():
        why = None
        try:
            saved = ckpt.restore_config(step)
        except Exception as e:
            why = f"its config cannot be read: {reason(e)}"
        if why is None:
            check_resumable(saved, cfg, ckpt.directory)
            try:
                state = ckpt.restore_state(abstract_state, step)
                ckpt.check_data(step)
            except Exception as e:
                why = f"it cannot be read: {reason(e)}"
        if why is None and not bool(jax.device_get(guard.all_finite(state))):
            why = "it holds NaN or Inf"
        if _agree(why is None):
            return state
        why = why or "another process cannot read it"
        damaged.append(f"{step} ({why})")
        _set_aside(ckpt, step, why)
    if damaged:
        raise CheckpointError(
            f"no intact checkpoint in {ckpt.directory}: {'; '.join(damaged)}; they were moved to "
            f"{ckpt.directory}-damaged; run the same command again to start from step 0"
        )
    return None
