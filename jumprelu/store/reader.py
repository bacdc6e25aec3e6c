"""`open_store`: checks a store before any training work, then memory-maps it.

Every problem is a one-line `DataError` naming the store and the file: an incomplete
write (and which shard was in flight), a missing or truncated shard, a shard whose
header disagrees with metadata.json, an unknown format version or a field of the wrong
type (`metadata.py`), rows holding NaN/Inf, and rows whose bytes no longer match the
checksums the writer recorded (naming the shard and the row range).
"""

from __future__ import annotations

import logging
import os
import random

import numpy as np

from jumprelu.errors import DataError
from jumprelu.store import checksum
from jumprelu.store import format as fmt
from jumprelu.store.metadata import fail as _fail
from jumprelu.store.metadata import read_metadata

log = logging.getLogger("jumprelu")
_warned_unverified: set[str] = set()

NONFINITE_POLICIES = ("fail", "drop")


class Store:
    """A validated store. Shards open lazily as memory maps; pickling drops the maps."""

    def __init__(self, path: str, metadata: dict, bad_rows: list[np.ndarray]):
        self.path = path
        self.metadata = metadata
        self.bad_rows = bad_rows  # per shard: sorted indices of rows to leave out
        self._maps: dict[int, np.ndarray] = {}
        self._map_bytes: dict[int, int] = {}  # per mapped shard: the file size its map needs
        self._verified: set[tuple[int, int]] = set()  # (shard, block) whose CRC this process checked

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

    @property
    def checksummed(self) -> bool:
        # format 1 kept no checksums: a checksum field in one is not read (metadata checks it from 2 on)
        return "checksum" in self.metadata and self.metadata.get("format_version", 1) >= 2

    def shard(self, index: int) -> np.ndarray:
        """Shard `index` as a read-only memory map [rows, d_model] in the store's dtype."""
        if index not in self._maps:
            name = self.metadata["shards"][index]["file"]
            try:
                mapped = np.load(os.path.join(self.path, name), mmap_mode="r")
            except (OSError, ValueError) as e:  # e.g. "mmap length is greater than file size"
                _fail(self.path, f"{name} can no longer be read ({e}): it changed after the store was opened")
            self._map_bytes[index] = int(mapped.offset) + mapped.nbytes
            self._maps[index] = mapped.view(fmt.numpy_dtype(self.dtype))
        return self._maps[index]

    def _check_still_whole(self, index: int) -> None:
        """Raises if a mapped shard's file is now shorter than its map: reading the missing pages
        would kill the process with SIGBUS instead of an error (a shard truncated or rewritten
        under a running job). One stat per read; a race inside that window is still possible."""
        name = self.metadata["shards"][index]["file"]
        try:
            found = os.stat(os.path.join(self.path, name)).st_size
        except FileNotFoundError:
            return  # deleted: the map keeps the old file's pages alive, so reading them is safe
        if found < self._map_bytes[index]:
            _fail(
                self.path,
                f"{name} is now {found} bytes, {self._map_bytes[index]} when this process mapped it: "
                "the shard was truncated or rewritten while in use; restore it from a copy or write "
                "the store again",
            )

    def rows(self, index: int, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of shard `index`. Each checksum block they touch is checked against
        metadata.json the first time this process reads it, so a shard damaged or replaced after
        it was written is found when its rows are read, not only if the start's sample hits it
        (one more read of each block per process)."""
        self.shard(index)
        self._check_still_whole(index)
        if self.checksummed and hi > lo:
            per_block = int(self.metadata["checksum"]["block_rows"])
            blocks = [b for b in range(lo // per_block, (hi - 1) // per_block + 1) if (index, b) not in self._verified]
            if blocks:
                _check_blocks(self, index, blocks)
                self._verified.update((index, b) for b in blocks)
        return self._maps[index][lo:hi]

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}, "_map_bytes": {}}


def _check_shard(path: str, meta: dict, shard: dict) -> None:
    """Header and size of one shard, without reading its rows."""
    file = os.path.join(path, shard["file"])
    if not os.path.exists(file):
        _fail(path, f"{shard['file']} is missing ({fmt.METADATA} lists {len(meta['shards'])} shards)")
    problem = fmt.shard_file_problem(file, shard["rows"], meta["d_model"], meta["dtype"], fmt.METADATA)
    if problem:
        _fail(path, f"{shard['file']} {problem}")


def _verify_shard(store: Store, index: int, chunk_rows: int = 16384) -> np.ndarray:
    """Re-reads every row of shard `index`: its checksums (if recorded) and its NaN/Inf rows.

    Returns the rows holding NaN/Inf; raises if the bytes or that count disagree with metadata.json.
    """
    shard = store.metadata["shards"][index]
    if store.checksummed:
        _check_blocks(store, index, range(len(shard["crc32"])))
    rows = store.shard(index)
    bad = [
        start + np.flatnonzero(~np.isfinite(rows[start : start + chunk_rows]).all(axis=1))
        for start in range(0, rows.shape[0], chunk_rows)
    ]
    bad = np.concatenate(bad) if bad else np.zeros(0, np.int64)
    if bad.tolist() != sorted(shard["nonfinite_rows"]):
        where = f"first: row {int(bad[0])}" if len(bad) else "none"
        _fail(
            store.path,
            f"{shard['file']} holds {len(bad)} rows with NaN or Inf ({where}) where {fmt.METADATA} records "
            f"{len(shard['nonfinite_rows'])}: the shard changed after it was written",
        )
    return bad


def _check_blocks(store: Store, index: int, blocks) -> None:
    """Raises on the first block of shard `index` among `blocks` whose CRC-32 disagrees with metadata.json."""
    shard = store.metadata["shards"][index]
    per_block = store.metadata["checksum"]["block_rows"]
    rows = np.load(os.path.join(store.path, shard["file"]), mmap_mode="r")  # the file's own dtype: its bytes
    bad = checksum.mismatches(rows, shard["crc32"], per_block, blocks)
    if bad:
        _, lo, hi, found, expected = bad[0]
        _fail(
            store.path,
            f"{shard['file']} rows {lo}-{hi - 1} do not match their checksum (crc32 {found:08x}, "
            f"{fmt.METADATA} records {expected:08x}): the shard changed after it was written; "
            "restore it from a copy or write the store again",
        )


def _sample_blocks(store: Store, count: int) -> None:
    """Checks `count` blocks drawn at random from the whole store (different ones at each start)."""
    blocks = [(i, b) for i, s in enumerate(store.metadata["shards"]) for b in range(len(s["crc32"]))]
    for i, b in sorted(random.sample(blocks, min(count, len(blocks)))):
        _check_blocks(store, i, [b])


def open_store(path: str, *, nonfinite: str = "fail", verify: bool = False, sample_blocks: int = 0) -> Store:
    """Validates the store at `path` and returns it.

    nonfinite: rows holding NaN/Inf (counted by the writer) either fail the open ("fail")
      or are left out of training and evaluation ("drop").
    verify: re-read every row: every block's checksum and the NaN/Inf count must agree
      with metadata.json.
    sample_blocks: without `verify`, check the checksums of this many random blocks
      (training does at every start; `checksum.START_SAMPLE_BLOCKS`).
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise DataError(f"store {path}: nonfinite policy must be one of {NONFINITE_POLICIES}, found {nonfinite!r}")
    meta = read_metadata(path)
    for shard in meta["shards"]:
        _check_shard(path, meta, shard)
    store = Store(path, meta, [np.asarray(sorted(s["nonfinite_rows"]), np.int64) for s in meta["shards"]])
    if not store.checksummed and (verify or sample_blocks) and path not in _warned_unverified:
        _warned_unverified.add(path)
        log.warning(
            "store %s has format_version %s, which records no checksums: its rows cannot be verified "
            "(write it again with this jumprelu to protect it)",
            path,
            meta["format_version"],
        )
    if verify:
        store.bad_rows = [_verify_shard(store, i) for i in range(len(meta["shards"]))]
    elif sample_blocks and store.checksummed:
        _sample_blocks(store, sample_blocks)
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
