"""The activation store's on-disk format: names, version, metadata schema, atomic files.

A store is a directory:

  metadata.json        written last, by `StoreWriter.close`; its presence means complete
  shard-00000.npy      [rows, d_model] float32 (bfloat16 stored as its uint16 bits)
  shard-00001.npy      ...
  writing.json         only while a write is in progress: what is committed so far

A store written by several processes at once (a multi-host harvest) has one part per process:
process k writes shard-p{k:03d}-00000.npy, ... and records them in writing-p{k:03d}.json, so no
two processes ever touch the same file; when every part is complete one process lists all
parts' shards in metadata.json (`commit.commit_parts`). Readers only follow metadata.json, so
they read both layouts alike.

Format 2 adds CRC-32 checksums of each shard's rows, per block (`checksum.py`); format 1
stores (no checksums) still load, as unverified.

Shards are plain `.npy` files so that they can be memory-mapped: a reader copies
contiguous blocks of rows straight from the page cache, at memory speed when cached
and at disk speed when not (see README, "Activation store"). ArrayRecord with one row
per record costs one reader call and one Python object per row and measured 5–30×
slower here; its zstd saves only ~8% on float activations.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re

import ml_dtypes
import numpy as np

from jumprelu.errors import DataError

FORMAT = "jumprelu-activation-store"
FORMAT_VERSION = 2  # what the writer writes
READABLE_VERSIONS = (1, 2)  # 1: no checksums
METADATA = "metadata.json"
WRITING = "writing.json"
DTYPES = ("float32", "bfloat16")

# Fields every metadata.json carries (besides `shards`, `num_rows`, `scale`).
HEADER_FIELDS = ("model", "site", "layer", "d_model", "dtype", "text_source", "shuffle_seed")


def shard_name(index: int, part: int | None = None) -> str:
    return f"shard-{index:05d}.npy" if part is None else f"shard-p{part:03d}-{index:05d}.npy"


_PART_SHARD = re.compile(r"shard-p(\d+)-(\d+)\.npy")


def part_shard(name: str) -> tuple[int, int] | None:
    """(part, index) of a part's shard file name (`shard_name(index, part)`), else None."""
    found = _PART_SHARD.fullmatch(name)
    return (int(found[1]), int(found[2])) if found else None


def written_by_parts(metadata: dict) -> bool:
    """Whether several processes wrote the store (its shards are shard-pKKK-NNNNN.npy)."""
    return any(str(s.get("file", "")).startswith("shard-p") for s in metadata.get("shards") or [])


def temporary_name(index: int, part: int | None = None) -> str:
    return f".{shard_name(index, part)}.tmp"


def writing_name(part: int | None = None) -> str:
    """The progress file of a one-process write, or of part `part` of a multi-process one."""
    return WRITING if part is None else f"writing-p{part:03d}.json"


PART_WRITING_GLOB = "writing-p[0-9][0-9][0-9].json"


def is_float(dtype) -> bool:
    """numpy's float dtypes and bfloat16 (ml_dtypes', which numpy does not count as floating)."""
    return np.issubdtype(dtype, np.floating) or np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16)


def numpy_dtype(dtype: str) -> np.dtype:
    """The dtype rows have in memory (the file holds bfloat16 as uint16 bits)."""
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)


def file_dtype(dtype: str) -> np.dtype:
    return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(np.float32)


def shard_file_problem(file: str, rows: int, d_model: int, dtype: str, source: str) -> str | None:
    """What is wrong with a shard file against what `source` (metadata.json, writing.json) records,
    from its header and size alone (no rows read), or None: unreadable, another shape or dtype,
    truncated or grown."""
    try:
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, found_dtype = read_header(f)
            offset = f.tell()
    except (OSError, ValueError) as e:
        return f"is not a readable .npy file ({e})"
    if tuple(shape) != (rows, d_model) or fortran or found_dtype != file_dtype(dtype):
        order = " (Fortran order)" if fortran else ""
        return f"holds {list(shape)} {found_dtype}{order}, {source} says {[rows, d_model]} {dtype}"
    expected = offset + rows * d_model * found_dtype.itemsize
    found = os.path.getsize(file)
    if found != expected:
        return f"is truncated or damaged: expected {expected} bytes, found {found}"
    return None


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomically(path: str, obj: dict, exclusive: bool = False) -> None:
    """Temporary file, fsync, rename, fsync the directory: readers see the old or the new file.

    exclusive: publish only if `path` does not exist yet (a hard link, which fails if it does),
    else FileExistsError; where the file system has no hard links, checked just before the rename.
    """
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if not exclusive:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)
            os.remove(tmp)
        except FileExistsError:
            os.remove(tmp)
            raise
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
            if os.path.exists(path):
                os.remove(tmp)
                raise FileExistsError(errno.EEXIST, "exists", path) from None
            os.replace(tmp, path)
    fsync_directory(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def writing(store: str, what: str):
    """An OSError while writing `what` (a full disk, a read-only directory) as one line."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            reason += "; free some space and run the same command again: it resumes after the last complete shard"
        raise DataError(f"store {store}: cannot write {what}: {reason}") from None


# How the stores of one model are named inside a directory of stores: the harvest's default
# template and what the experiments read, so harvesting then training composes.
SITE_STORE_TEMPLATE = "{site}_l{layer}"


def site_store_name(site: str, layer: int) -> str:
    return SITE_STORE_TEMPLATE.format(site=site, layer=layer)
