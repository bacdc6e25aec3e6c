"""`StoreWriter`: the one way activations get into a store, for every producer.

Rows are appended in any chunk size. Each full shard is shuffled (rows of one text
window are adjacent when they arrive; readers copy blocks of adjacent rows, so the
mixing has to happen here), written under a temporary name, fsynced and renamed; only
then is it recorded in `writing.json` with the CRC-32 of each block of its rows
(`checksum.py`). `metadata.json` is written last, by `close`. A failed write (a full
disk) is a one-line `DataError`; what was committed stays, and the same command resumes.

A producer that was interrupted opens the writer again with the same header: the
writer reports `rows_written`, the rows safely in complete shards, and the producer
appends from that row on. Rows that were buffered or in a half-written shard at the
crash are simply produced again, so no row is lost or duplicated.

Several processes fill one store together (a multi-host harvest) by each opening a writer
with `part=k, parts=P`: part k has its own shard names and progress file (format.py), so the
writers never touch each other's files and each resumes from its own row count. `close`
then only marks the part complete; once every part is, one process calls `commit.commit_parts`.
"""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np

from jumprelu.errors import DataError
from jumprelu.store import checksum, commit, progress
from jumprelu.store import format as fmt
from jumprelu.store.lock import WriterLock, layout_lock

DEFAULT_SHARD_BYTES = 256 << 20


def _row_squared_norms(rows: np.ndarray) -> np.ndarray:
    """‖row‖² per row; float32 math (one pass, no copy) for float32 rows."""
    if rows.dtype not in (np.float32, np.float64):
        rows = rows.astype(np.float32)
    return np.einsum("ij,ij->i", rows, rows)


def _foreign_files(path: str) -> list[str]:
    """The entries of a local directory that no store write makes (shards, progress records,
    metadata, and its hidden locks and temporaries)."""
    if not os.path.isdir(path):
        return []
    # metadata.json.tmp: a crash while publishing the metadata; lost+found: the root of a new ext4 disk
    mine = ("shard-", "writing", ".", fmt.METADATA)
    with fmt.writing(path, "the directory"):
        names = os.listdir(path)
    return sorted(n for n in names if not n.startswith(mine) and n != "lost+found")


class StoreWriter:
    def __init__(
        self,
        path: str,
        *,
        d_model: int,
        dtype: str = "float32",
        model: str = "",
        site: str = "",
        layer: int | None = None,
        text_source: str = "",
        shuffle_seed: int | None = 0,
        shard_rows: int | None = None,
        extra: dict | None = None,
        part: int | None = None,
        parts: int | None = None,
    ):
        if (part is None) != (parts is None) or (part is not None and not 0 <= part < parts):
            raise DataError(f"store {path}: part must be in [0, parts), found part={part} parts={parts}")
        self.part, self.parts = part, parts
        self._complete = False  # a part that an earlier run already finished
        if dtype not in fmt.DTYPES:
            raise DataError(f"store {path}: dtype must be one of {fmt.DTYPES}, found {dtype!r}")
        if not (isinstance(d_model, int) and d_model > 0):
            raise DataError(f"store {path}: d_model must be a positive integer, found {d_model!r}")
        if shard_rows is not None and not (isinstance(shard_rows, int) and shard_rows > 0):
            raise DataError(f"store {path}: shard_rows must be a positive integer, found {shard_rows!r}")
        if shuffle_seed is not None and not (isinstance(shuffle_seed, int) and shuffle_seed >= 0):
            raise DataError(f"store {path}: shuffle_seed must be an integer >= 0, found {shuffle_seed!r}")
        self.path = path
        row_bytes = d_model * fmt.file_dtype(dtype).itemsize
        self.shard_rows = int(shard_rows or max(1, DEFAULT_SHARD_BYTES // row_bytes))
        self.block_rows = checksum.block_rows(row_bytes)
        self.header = dict(
            model=model,
            site=site,
            layer=layer,
            d_model=d_model,
            dtype=dtype,
            text_source=text_source,
            shuffle_seed=shuffle_seed,
            shard_rows=self.shard_rows,
            extra=dict(extra or {}),  # producer details (harvest: checkpoint, tokenizer, seq_len, ...)
        )
        try:  # as writing.json will read back (tuples become lists), so a resume compares like with like
            self.header = json.loads(json.dumps(self.header, default=_json_number))
        except TypeError as e:
            raise DataError(f"store {path}: the writer's settings must be JSON values ({e})") from None
        # One shard's rows are gathered in a buffer allocated once and reused, plus one for the shuffle.
        self._buffer = np.empty((0, d_model), fmt.numpy_dtype(dtype))
        self._shuffled = np.empty((0, d_model), fmt.numpy_dtype(dtype))
        self._buffered = 0
        self._shards: list[dict] = []
        if os.path.exists(os.path.join(path, fmt.METADATA)):
            raise DataError(f"store {path} is already complete ({fmt.METADATA} exists); write to a new directory")
        foreign = _foreign_files(path)
        if foreign:  # e.g. a training workdir: shards would land beside its checkpoints
            raise DataError(
                f"store {path}: holds {foreign[0]!r}, which is no store's; write a store into a new or empty "
                "directory (or one holding an interrupted store write, to resume it)"
            )
        with fmt.writing(path, "the directory"):
            os.makedirs(path, exist_ok=True)
        self._lock = WriterLock(path, part)
        self._lock.acquire()
        try:
            if os.path.exists(os.path.join(path, fmt.METADATA)):  # another writer finished while we waited
                raise DataError(f"store {path} is already complete ({fmt.METADATA} exists); write to a new directory")
            with fmt.writing(path, "the directory"), layout_lock(path):
                self._shards, self._complete = progress.resume(
                    path, self.header, part, parts, self.block_rows, self.shard_rows
                )
                self._record_progress()
        except BaseException:
            self._lock.release()
            raise

    def _record_progress(self) -> None:
        progress.record(self.path, self.header, self._shards, self.part, self.parts, self._complete)

    @property
    def rows_written(self) -> int:
        """Rows in complete shards: a resuming producer appends from this row on."""
        return sum(s["rows"] for s in self._shards)

    @property
    def buffered_rows(self) -> int:
        """Rows appended but not yet in a complete shard (lost if the process dies now)."""
        return self._buffered

    # -- writing --------------------------------------------------------------------------------
    def append(self, rows: np.ndarray) -> None:
        """Adds rows [n, d_model] (any float dtype; converted to the store's dtype)."""
        rows = np.asarray(rows)
        if self._complete and rows.shape[0]:
            raise DataError(f"store {self.path}: part {self.part} is already complete; it takes no more rows")
        d = self.header["d_model"]
        if rows.ndim != 2 or rows.shape[1] != d:
            raise DataError(f"store {self.path}: rows must have shape [n, {d}], found {list(rows.shape)}")
        if not fmt.is_float(rows.dtype):
            raise DataError(f"store {self.path}: rows must be floating point, found dtype {rows.dtype}")
        if rows.dtype.itemsize > 4:  # float64: a finite value past float32's range was stored as Inf
            self._check_range(rows)
        at = 0
        while at < rows.shape[0]:
            take = min(rows.shape[0] - at, self.shard_rows - self._buffered)
            self._reserve(self._buffered + take)
            self._buffer[self._buffered : self._buffered + take] = rows[at : at + take]
            self._buffered += take
            at += take
            if self._buffered == self.shard_rows:
                self._flush()

    def _check_range(self, rows: np.ndarray) -> None:
        limit = float(np.finfo(np.float32).max)  # bfloat16's range is float32's
        with np.errstate(invalid="ignore"):
            over = np.isfinite(rows) & (np.abs(rows) > limit)
        if over.any():
            r, c = (int(i) for i in np.argwhere(over)[0])
            raise DataError(
                f"store {self.path}: row {self.rows_written + self._buffered + r}, column {c} holds {rows[r, c]:.6g}, "
                f"beyond the {self.header['dtype']} range (±{limit:.4g}): it would be stored as Inf"
            )

    def _reserve(self, rows: int) -> None:
        """A buffer of at least `rows` rows, grown by doubling up to shard_rows: a shard as large as
        the input is only allocated when that many rows come (a 1-row input with a huge
        --shard_rows was a MemoryError, and left a write that refused the corrected rerun)."""
        have = self._buffer.shape[0]
        if rows > have:
            grown = np.empty(
                (min(self.shard_rows, max(rows, 2 * have, 4096)), self._buffer.shape[1]), self._buffer.dtype
            )
            grown[: self._buffered] = self._buffer[: self._buffered]
            self._buffer = grown

    def _flush(self) -> None:
        index, n = len(self._shards), self._buffered
        rows = self._buffer[:n]
        seed = self.header["shuffle_seed"]
        if seed is not None:
            if self._shuffled.shape[0] < n:
                self._shuffled = np.empty_like(self._buffer)
            key = [seed, index] if self.part is None else [seed, self.part, index]
            rows = np.take(rows, np.random.default_rng(key).permutation(n), axis=0, out=self._shuffled[:n])
        sq = _row_squared_norms(rows)
        finite = np.ones(n, bool)
        if not np.isfinite(sq).all():  # NaN/Inf rows, or a float32 square that overflowed: test exactly
            finite = np.isfinite(rows).all(axis=1)
            sq = _row_squared_norms(np.where(finite[:, None], rows, 0).astype(np.float64))
        sum_sq = float(np.sum(sq, dtype=np.float64))
        name = fmt.shard_name(index, self.part)
        tmp = os.path.join(self.path, fmt.temporary_name(index, self.part))
        file_rows = rows.view(fmt.file_dtype(self.header["dtype"]))
        crcs = checksum.block_checksums(file_rows, self.block_rows)
        with fmt.writing(self.path, name):
            try:
                with open(tmp, "wb") as f:
                    # through write(): numpy's tofile path reports a full disk without its errno
                    np.save(_Sink(f), file_rows, allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError:
                with contextlib.suppress(OSError):  # give the space back; the shard is written again on resume
                    os.remove(tmp)
                raise
            os.replace(tmp, os.path.join(self.path, name))
            fmt.fsync_directory(self.path)
        self._shards.append(
            {
                "file": name,
                "rows": n,
                "sum_sq_norm": sum_sq,
                "nonfinite_rows": np.flatnonzero(~finite).tolist(),
                "crc32": crcs,
            }
        )
        self._buffered = 0
        self._record_progress()

    def close(self) -> dict:
        """Writes the last (short) shard and then metadata.json; returns the metadata.

        A part (`part=k`) is only marked complete, and the return value is its progress record:
        metadata.json is `commit_parts`'s, once every part is complete.
        """
        if self._buffered:
            self._flush()
        if self.part is not None:
            self._complete = True
            self._record_progress()
            self._lock.release(remove=True)
            return {"part": self.part, "rows": self.rows_written, "shards": len(self._shards)}
        if not self._shards:
            raise DataError(f"store {self.path}: no rows were written")
        if (error := commit.unscalable(self.path, self._shards)) is not None:
            self._discard()  # worthless rows: left, they made the corrected rerun "resume" this write
            raise DataError(f"{error}; the shards written are removed")
        metadata = commit.write_metadata(self.path, self.header, self._shards, self.block_rows)
        os.remove(os.path.join(self.path, fmt.WRITING))
        self._lock.release(remove=True)
        return metadata

    def _discard(self) -> None:
        """Removes every file this write made (its shards, progress record and lock), leaving the
        directory as a new write finds an empty one."""
        commit.remove_files(self.path, [s["file"] for s in self._shards] + [fmt.WRITING])
        self._shards = []
        self._lock.release(remove=True)


class _Sink:
    """A file as numpy sees a non-file stream: np.save then writes chunks through `write`, whose
    OSError carries ENOSPC (a real file goes through ndarray.tofile, whose error has no errno)."""

    def __init__(self, f):
        self.write = f.write


def _json_number(value):
    """numpy integers and floats (a layer read from an array) as JSON numbers; anything else refused."""
    if isinstance(value, np.integer | np.floating):
        return value.item()
    raise TypeError(f"{value!r} of type {type(value).__name__} is not a JSON value")
