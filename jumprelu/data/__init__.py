"""Activation sources behind the `data.source` config field: the synthetic default, a store, or "lm"."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zlib
from typing import Protocol

import jax
import numpy as np

from jumprelu import fs
from jumprelu.data import synthetic
from jumprelu.data.stream import BatchStream
from jumprelu.errors import ConfigError, DataError
from jumprelu.store import Store, checksum, open_store
from jumprelu.store import format as store_format
from jumprelu.store.metadata import read_metadata

__all__ = [
    "BatchStream",
    "DataError",
    "TrainingRows",
    "open_source",
    "make_stream",
    "ground_truth",
    "source_d_model",
    "source_row_itemsize",
]

LM_SOURCE = "lm"  # data.source: rows computed by the language model during training (jumprelu.harvest.onthefly)


class TrainingRows(Protocol):
    """What the training loop reads rows from: a `BatchStream` over a store, or another source
    passed to `train.loop.train` (the on-the-fly LM rows of `jumprelu.harvest.onthefly`), whose
    `batch_iterator` gives an iterator with `get_state` / `set_state` like the store's Grain one."""

    d_model: int
    dtype: str  # of the batches
    scale: float  # C with E‖x/C‖² = 1
    num_train_rows: int  # rows before the stream repeats

    def read(self, position: int, count: int) -> np.ndarray: ...

    def eval_set(self) -> np.ndarray: ...

    def close(self) -> None: ...


def _synthetic_store_path(data_cfg, workdir: str) -> str:
    """Where the synthetic rows are written: beside the run, one copy per process."""
    suffix = f".p{jax.process_index()}" if jax.process_count() > 1 else ""
    if "://" in workdir:  # memory maps need a local file system
        digest = hashlib.sha1(json.dumps(data_cfg.synthetic.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
        return os.path.join(tempfile.gettempdir(), f"jumprelu_synthetic_{digest}{suffix}")
    return os.path.join(workdir, "synthetic_store" + suffix)


def open_source(data_cfg, workdir: str) -> Store:
    """The validated store named by `data.source`, checked against `data.d_model`.

    "synthetic" first writes the synthetic rows into a store under `workdir` (once;
    an interrupted write resumes), so the quickstart trains through the same reader.
    """
    if data_cfg.source == LM_SOURCE:
        raise ConfigError(
            f"config field data.source is {LM_SOURCE!r}: those rows come from the language model, which only "
            "`jumprelu train` (and `jumprelu evaluate`) open; train a store-backed run for this command"
        )
    if data_cfg.source == "synthetic":
        width = data_cfg.synthetic.d_model
        if data_cfg.d_model is not None and data_cfg.d_model != width:  # before the rows are made
            raise ConfigError(
                f"config field data.d_model is {data_cfg.d_model} but the synthetic rows have "
                f"data.synthetic.d_model={width}; set that instead (or unset data.d_model)"
            )
        path = _synthetic_store_path(data_cfg, workdir)
        synthetic.write_store(synthetic.SyntheticSpec.from_config(data_cfg.synthetic), path)
    elif str(data_cfg.source).endswith(".npy"):
        raise ConfigError(
            f"config field data.source must be 'synthetic' or an activation store directory, found the .npy file "
            f"{data_cfg.source}; convert it first: jumprelu store convert {data_cfg.source} STORE_DIR"
        )
    else:
        path = data_cfg.source
        if "://" not in str(path) and not os.path.isdir(path):
            what = "a file, not a store directory" if os.path.exists(path) else "no such directory"
            raise ConfigError(
                f"config field data.source is {path!r}: {what}; expected an activation store directory, "
                "'synthetic' or 'lm'"
            )
    # Every open checks a few random blocks against the writer's checksums: changed bytes are
    # caught before training on them even without data.verify (which re-reads every row).
    sample = 0 if data_cfg.verify else checksum.START_SAMPLE_BLOCKS
    store = open_store(path, nonfinite=data_cfg.nonfinite, verify=data_cfg.verify, sample_blocks=sample)
    if data_cfg.d_model is not None and data_cfg.d_model != store.d_model:
        raise ConfigError(
            f"config field data.d_model is {data_cfg.d_model} but data.source {path} has d_model {store.d_model}"
        )
    return store


def trained_on(data_cfg, rows) -> dict:
    """What a run's rows are, saved with its config (`trained_on`) so that exports name the model and
    hook, and evaluate/refit find the store, from any directory and after the store has moved: the
    store's absolute path and the harvest's model, site, layer, sequence length and texts."""
    if data_cfg.source == LM_SOURCE:
        lm = data_cfg.lm
        texts = ",".join(lm.get("texts") or ()) or None
        return dict(model=lm.model, site=lm.site, layer=lm.layer, seq_len=lm.get("seq_len"), text_source=texts)
    store = getattr(rows, "store", None)
    if store is None or data_cfg.source == "synthetic":
        return {}
    meta = store.metadata
    return dict(
        path=fs.abspath(store.path),
        rows=store_fingerprint(store),
        model=meta.get("model") or None,
        site=meta.get("site") or None,
        layer=meta.get("layer"),
        seq_len=(meta.get("extra") or {}).get("seq_len"),
        text_source=meta.get("text_source") or None,
    )


def store_fingerprint(store: Store) -> str:
    """Which rows a store holds, in a line: its row count and a CRC of its shards' block checksums
    (of its metadata, for a format-1 store that kept none). A store rewritten at the same path
    has another."""
    return metadata_fingerprint(store.metadata)


def metadata_fingerprint(meta: dict) -> str:
    """`store_fingerprint` from a store's metadata.json alone (no shard opened)."""
    crcs = [s.get("crc32") for s in meta.get("shards", [])]
    basis = [meta.get("num_rows"), crcs] if crcs and all(crcs) else meta  # format 1: its metadata, creation time too
    return f"{meta.get('num_rows')} rows, crc32 {zlib.crc32(json.dumps(basis, sort_keys=True).encode()):08x}"


def check_same_store(config: dict, store: Store, command: str) -> None:
    """A DataError when the store now at the run's recorded path is not the one it trained on:
    `command` would report on (or fit to) other rows as if they were the run's."""
    recorded, now = (config.get("trained_on") or {}).get("rows"), store_fingerprint(store)
    if recorded is not None and recorded != now:
        raise DataError(
            f"store {store.path}: holds other rows than the run trained on ({now}; "
            f"the run recorded {recorded}): it was rewritten since; {command} needs the run's own store"
        )


def run_source(config: dict, store: str | None, command: str) -> str:
    """The store a saved run's command (evaluate, refit) reads: `store` when given (the run's store
    moved; the command checks it holds the same rows), else the recorded one (`recorded_source`),
    whose absence is one line saying how to point at it."""
    source = recorded_source(config)
    if store and source in ("synthetic", LM_SOURCE):  # nothing to check a store against: any was taken
        what = "synthetic data, remade from its config" if source == "synthetic" else "rows its LM computed"
        raise DataError(
            f"{command} --store {store}: the run trained on {what} (data.source={source!r}), not on a store; "
            "--store is for a run whose store moved"
        )
    if store:
        return store
    if source not in ("synthetic", LM_SOURCE) and "://" not in source and not os.path.isdir(source):
        raise DataError(
            f"the run's store {source} is gone (moved or deleted); if it moved, give its new path: "
            f"{command} --store PATH"
        )
    return source


def recorded_source(config: dict) -> str:
    """The store a saved run config trained on: the absolute path recorded in training
    (`trained_on.path`) while it is there (a relative `data.source` depends on the directory it is
    read from), else `data.source`."""
    source = str(config["data"]["source"])
    path = (config.get("trained_on") or {}).get("path")
    if source in ("synthetic", LM_SOURCE) or not path:
        return source
    return path if "://" in path or os.path.isdir(path) else source


def make_stream(data_cfg, store: Store) -> BatchStream:
    row_bytes = store.d_model * store_format.file_dtype(store.dtype).itemsize
    block_rows = max(1, data_cfg.block_bytes // row_bytes)
    return BatchStream(store, eval_rows=data_cfg.eval_rows, seed=data_cfg.seed, block_rows=block_rows)


def source_d_model(data_cfg) -> int:
    """d_model without reading rows: `data.d_model`, else the synthetic spec or the store's metadata."""
    if data_cfg.d_model is not None:
        return data_cfg.d_model
    if data_cfg.source == "synthetic":
        return data_cfg.synthetic.d_model
    if data_cfg.source == LM_SOURCE:
        raise ConfigError(f"config field data.d_model must be set for data.source {LM_SOURCE!r} (the site's width)")
    return int(read_metadata(data_cfg.source)["d_model"])


def source_row_itemsize(data_cfg) -> int | None:
    """Bytes per stored activation value the pipeline reads (2 for a bfloat16 store, 4 for float32
    and the synthetic source), without reading rows; None for on-the-fly LM activations, which
    are made on the device, not read."""
    if data_cfg.source == "synthetic":
        return 4
    if data_cfg.source == LM_SOURCE:
        return None
    return int(store_format.file_dtype(read_metadata(data_cfg.source)["dtype"]).itemsize)


def ground_truth(data_cfg):
    """The true feature directions [F, d] when the source is synthetic, else None."""
    if data_cfg.source != "synthetic":
        return None
    return synthetic.true_directions(synthetic.SyntheticSpec.from_config(data_cfg.synthetic))
