"""The activation store's on-disk format: names, version, metadata schema, atomic files.

A store is a directory:

  metadata.json        written last, by `StoreWriter.close`; its presence means complete
  shard-00000.npy      [rows, d_model] float32 (bfloat16 stored as its uint16 bits)
  shard-00001.npy      ...
  writing.json         only while a write is in progress: what is committed so far

Format 2 adds CRC-32 checksums of each shard's rows, per block (`checksum.py`); format 1
stores (no checksums) still load, as unverified.

Shards are plain `.npy` files so that they can be memory-mapped: a reader copies
contiguous blocks of rows straight from the page cache, at memory speed when cached
and at disk speed when not (see README, "Activation store"). ArrayRecord with one row
per record costs one reader call and one Python object per row and measured 5–30×
slower here; its zstd saves only ~8% on float activations.
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

FORMAT = "jumprelu-activation-store"
FORMAT_VERSION = 2  # what the writer writes
READABLE_VERSIONS = (1, 2)  # 1: no checksums
METADATA = "metadata.json"
WRITING = "writing.json"
DTYPES = ("float32", "bfloat16")

# Fields every metadata.json carries (besides `shards`, `num_rows`, `scale`).
HEADER_FIELDS = ("model", "site", "layer", "d_model", "dtype", "text_source", "shuffle_seed")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npy"


def temporary_name(index: int) -> str:
    return f".{shard_name(index)}.tmp"


def numpy_dtype(dtype: str) -> np.dtype:
    """The dtype rows have in memory (the file holds bfloat16 as uint16 bits)."""
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)


def file_dtype(dtype: str) -> np.dtype:
    return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(np.float32)


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomically(path: str, obj: dict) -> None:
    """Temporary file, fsync, rename, fsync the directory: readers see the old or the new file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(os.path.dirname(os.path.abspath(path)))


# How the stores of one model are named inside a directory of stores: the harvest's default
# template and what the experiments read, so harvesting then training composes.
SITE_STORE_TEMPLATE = "{site}_l{layer}"


def site_store_name(site: str, layer: int) -> str:
    return SITE_STORE_TEMPLATE.format(site=site, layer=layer)
