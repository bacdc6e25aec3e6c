"""`open_store`: checks a store completely before any training work, then memory-maps it.

Every problem is a one-line `DataError` naming the store and the file: an incomplete
write (and which shard was in flight), a missing or truncated shard, a shard whose
header disagrees with metadata.json, an unknown format version, rows holding NaN/Inf.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from jumprelu.errors import DataError
from jumprelu.store import format as fmt

NONFINITE_POLICIES = ("fail", "drop")


class Store:
    """A validated store. Shards open lazily as memory maps; pickling drops the maps."""

    def __init__(self, path: str, metadata: dict, bad_rows: list[np.ndarray]):
        self.path = path
        self.metadata = metadata
        self.bad_rows = bad_rows  # per shard: sorted indices of rows to leave out
        self._maps: dict[int, np.ndarray] = {}

    @property
    def d_model(self) -> int:
        return int(self.metadata["d_model"])

    @property
    def dtype(self) -> str:
        return self.metadata["dtype"]

    @property
    def scale(self) -> float:
        return float(self.metadata["scale"])

    @property
    def num_rows(self) -> int:
        return int(self.metadata["num_rows"])

    @property
    def shard_rows(self) -> list[int]:
        return [int(s["rows"]) for s in self.metadata["shards"]]

    def shard(self, index: int) -> np.ndarray:
        """Shard `index` as a read-only memory map [rows, d_model] in the store's dtype."""
        if index not in self._maps:
            file = os.path.join(self.path, self.metadata["shards"][index]["file"])
            self._maps[index] = np.load(file, mmap_mode="r").view(fmt.numpy_dtype(self.dtype))
        return self._maps[index]

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}


def _fail(path: str, message: str):
    raise DataError(f"store {path}: {message}")


def read_metadata(path: str) -> dict:
    """metadata.json of the store at `path`, checked (format, version, fields), without touching shards."""
    if not os.path.isdir(path):
        _fail(path, "no such directory")
    meta_file = os.path.join(path, fmt.METADATA)
    if not os.path.exists(meta_file):
        progress = os.path.join(path, fmt.WRITING)
        if os.path.exists(progress):
            with open(progress) as f:
                done = json.load(f)["shards"]
            last = done[-1]["file"] if done else "none"
            in_flight = sorted(glob.glob(os.path.join(path, ".shard-*.tmp")))
            flight = f"; {os.path.basename(in_flight[0])[1:-4]} was being written" if in_flight else ""
            _fail(
                path,
                f"incomplete: the writer stopped after {len(done)} complete shards (last: {last}){flight}; "
                "run the writer again on this directory to resume",
            )
        _fail(path, f"not an activation store ({fmt.METADATA} missing)")
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        _fail(path, f"{fmt.METADATA} is not readable JSON ({e})")
    if meta.get("format") != fmt.FORMAT:
        _fail(path, f"{fmt.METADATA} field format must be {fmt.FORMAT!r}, found {meta.get('format')!r}")
    if meta.get("format_version") != fmt.FORMAT_VERSION:
        _fail(
            path,
            f"{fmt.METADATA} has format_version {meta.get('format_version')!r}; "
            f"this jumprelu reads version {fmt.FORMAT_VERSION}",
        )
    for field in (*fmt.HEADER_FIELDS, "num_rows", "scale", "shards"):
        if field not in meta:
            _fail(path, f"{fmt.METADATA} lacks the field {field!r}")
    if meta["dtype"] not in fmt.DTYPES:
        _fail(path, f"{fmt.METADATA} field dtype must be one of {fmt.DTYPES}, found {meta['dtype']!r}")
    if sum(s["rows"] for s in meta["shards"]) != meta["num_rows"]:
        _fail(path, f"{fmt.METADATA}: num_rows {meta['num_rows']} is not the sum of the shards' rows")
    return meta


def _check_shard(path: str, meta: dict, shard: dict) -> None:
    """Header and size of one shard, without reading its rows."""
    file = os.path.join(path, shard["file"])
    if not os.path.exists(file):
        _fail(path, f"{shard['file']} is missing ({fmt.METADATA} lists {len(meta['shards'])} shards)")
    try:
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    except (OSError, ValueError) as e:
        _fail(path, f"{shard['file']} is not a readable .npy file ({e})")
    expected_shape = (shard["rows"], meta["d_model"])
    if tuple(shape) != expected_shape or fortran or dtype != fmt.file_dtype(meta["dtype"]):
        _fail(
            path,
            f"{shard['file']} holds {list(shape)} {dtype}{' (Fortran order)' if fortran else ''}, "
            f"{fmt.METADATA} says {list(expected_shape)} {meta['dtype']}",
        )
    expected = offset + shard["rows"] * meta["d_model"] * dtype.itemsize
    found = os.path.getsize(file)
    if found != expected:
        _fail(path, f"{shard['file']} is truncated or damaged: expected {expected} bytes, found {found}")


def _scan_nonfinite(store: Store, index: int, chunk_rows: int = 16384) -> np.ndarray:
    rows = store.shard(index)
    bad = [
        start + np.flatnonzero(~np.isfinite(rows[start : start + chunk_rows]).all(axis=1))
        for start in range(0, rows.shape[0], chunk_rows)
    ]
    return np.concatenate(bad) if bad else np.zeros(0, np.int64)


def open_store(path: str, *, nonfinite: str = "fail", verify: bool = False) -> Store:
    """Validates the store at `path` and returns it.

    nonfinite: rows holding NaN/Inf (counted by the writer, or by `verify`) either fail
      the open ("fail") or are left out of training and evaluation ("drop").
    verify: re-read every row to count NaN/Inf instead of trusting metadata.json.
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise DataError(f"store {path}: nonfinite policy must be one of {NONFINITE_POLICIES}, found {nonfinite!r}")
    meta = read_metadata(path)
    for shard in meta["shards"]:
        _check_shard(path, meta, shard)
    store = Store(path, meta, [np.asarray(s["nonfinite_rows"], np.int64) for s in meta["shards"]])
    if verify:
        store.bad_rows = [_scan_nonfinite(store, i) for i in range(len(meta["shards"]))]
    counts = [(s["file"], len(b), b) for s, b in zip(meta["shards"], store.bad_rows, strict=False) if len(b)]
    if counts and nonfinite == "fail":
        total = sum(n for _, n, _ in counts)
        file, n, b = counts[0]
        _fail(
            path,
            f"{total} rows hold NaN or Inf (first: {file} row {int(b[0])}, {n} there); "
            "set data.nonfinite='drop' to train without them",
        )
    return store
