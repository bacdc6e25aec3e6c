"""Which folders a run may be trained in: checked under the workdir lock, before the data open.

A run writes config.json, report.json, metrics and checkpoints at its workdir's top, so a folder
that is another program's (a model's config.json), an activation store, or the inside of another
run's checkpoints is refused in one line. A run's own folder (even one killed before its first
checkpoint) and a folder of unrelated entries (notes, a store as a subfolder) are trained in.
"""

from __future__ import annotations

import json
import os

from jumprelu import fs
from jumprelu.errors import WorkdirError
from jumprelu.store import format as store_format
from jumprelu.train import lock

# what shows a folder is a run's, even one stopped before its first checkpoint: the lock (left by a
# killed run), the synthetic rows written beside it, the checkpoints, a config.json of a run's
RUN_ENTRIES = ("checkpoints", lock.LOCK_FILE, "synthetic_store")
# the files a run (and `jumprelu evaluate`) write at the workdir's top, replacing any of those names
RUN_FILES = ("config.json", "report.json", "metrics.jsonl", "training_curves.png", "eval.json")
CHECKPOINTS = "checkpoints"


def refuse_foreign_workdir(workdir: str) -> None:
    """A folder that is not a run's but holds a file a run would replace (a model's config.json, a
    project's report.json) is refused, and so are a store and a folder inside a run's checkpoints;
    other entries (a store as a subfolder, notes) are left alone beside the run."""
    if fs.is_remote(workdir) or not os.path.isdir(workdir):
        _refuse_inside_checkpoints(workdir)
        return
    names = os.listdir(workdir)
    if _is_store(workdir, names):  # --workdir and data.source swapped: the run's files among the shards
        raise WorkdirError(
            f"workdir {workdir} is an activation store ({store_format.METADATA} or shards of one); give the run a "
            "folder of its own (the store is its data.source)"
        )
    _refuse_inside_checkpoints(workdir)
    if any(n.startswith(RUN_ENTRIES) for n in names) or _is_run_config(workdir):
        return
    clash = [n for n in RUN_FILES if n in names]
    if clash:
        raise WorkdirError(
            f"workdir {workdir} holds {', '.join(clash)}, which no jumprelu run wrote and this run would "
            "replace; give a new or empty directory"
        )


def is_run_workdir(path: str) -> bool:
    """Whether local `path` is a run's workdir: its checkpoints beside a run's config.json or lock."""
    if fs.is_remote(path) or not os.path.isdir(os.path.join(path, CHECKPOINTS)):
        return False
    return _is_run_config(path) or os.path.exists(os.path.join(path, lock.LOCK_FILE))


def _refuse_inside_checkpoints(workdir: str) -> None:
    """RUN/checkpoints (or a step folder in it): the second run's checkpoints would sit among the
    first's, where orbax takes them for steps of its own."""
    if fs.is_remote(workdir):
        return
    path = os.path.abspath(workdir)
    while os.path.dirname(path) != path:
        parent = os.path.dirname(path)
        if os.path.basename(path) == CHECKPOINTS and (
            _is_run_config(parent) or os.path.exists(os.path.join(parent, lock.LOCK_FILE))
        ):
            raise WorkdirError(
                f"workdir {workdir} is inside the checkpoints of run {parent}; resume that run with --workdir "
                f"{parent}, or give a new directory"
            )
        path = parent


def _is_store(workdir: str, names: list[str]) -> bool:
    # its shards, or the progress record of a write under way (writing.json, a part's writing-p000.json)
    if any(n.startswith(("shard-", "writing")) and n.endswith((".npy", ".json")) for n in names):
        return True
    if store_format.METADATA not in names:
        return False
    try:
        with open(os.path.join(workdir, store_format.METADATA)) as f:
            return json.load(f).get("format") == store_format.FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _is_run_config(workdir: str) -> bool:
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and isinstance(saved.get("sae"), dict) and isinstance(saved.get("train"), dict)
