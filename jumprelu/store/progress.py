"""An interrupted write's record: `writing.json` (part k's: `writing-pKKK.json`, format.py).

`StoreWriter` rewrites it after every committed shard: the writer's header, the shards in
order (file, rows, CRC-32 per block, sum of squared norms) and, for a part of a multi-process
write, the part, the process count and whether the part is complete. A writer opened again on
the directory resumes from it (`resume`), trusting nothing in it unchecked: a record that is
not the writer's own (another header, another process count, a field out of range) is a
one-line `DataError` before any row is written, and anything on disk beyond the recorded
shards is a leftover of the crash, removed to be written again.
"""

from __future__ import annotations

import glob
import json
import math
import os

import numpy as np

from jumprelu.errors import DataError
from jumprelu.store import checksum, metadata
from jumprelu.store import format as fmt


def own_shards_glob(path: str, part: int | None, prefix: str = "") -> str:
    """Only this writer's files: a one-process write's shard-NNNNN, or part k's shard-pKKK-NNNNN."""
    pattern = "shard-[0-9]*" if part is None else f"shard-p{part:03d}-*"
    return os.path.join(path, prefix + pattern)


def resume(
    path: str, header: dict, part: int | None, parts: int | None, block_rows: int, shard_rows: int
) -> tuple[list[dict], bool]:
    """(the shards an interrupted write of this writer committed, whether its part is complete),
    or ([], False) for a new write; stray files of this writer beyond them are removed."""
    record_path = os.path.join(path, fmt.writing_name(part))
    other = (
        glob.glob(os.path.join(path, fmt.PART_WRITING_GLOB))
        if part is None
        else glob.glob(os.path.join(path, fmt.WRITING))
    )
    if other:
        kind = "a multi-process" if part is None else "a one-process"
        raise DataError(
            f"store {path}: {kind} write is in progress here ({os.path.basename(other[0])}); "
            "resume it with the same number of processes or write to a new directory"
        )
    shards, complete = [], False
    if os.path.exists(record_path):
        saved = _read(path, record_path)
        if saved.get("parts") != parts:
            raise DataError(
                f"store {path}: an interrupted write by {saved.get('parts') or 1} processes is in progress, "
                f"this run has {parts or 1}; resume with the same number of processes "
                "(each process's share of the texts depends on it) or write to a new directory"
            )
        for field, value in header.items():
            if saved["header"].get(field) != value:
                raise DataError(
                    f"store {path}: an interrupted write with {field}={saved['header'].get(field)!r} "
                    f"is in progress, this writer has {field}={value!r}; resume with the same settings "
                    "or write to a new directory"
                )
        for i, shard in enumerate(saved["shards"]):  # hand-edited or from another program
            _check_shard(path, record_path, i, shard, part, block_rows, shard_rows)
        shards, complete = saved["shards"], bool(saved.get("complete", False))
        for s in shards:
            file = os.path.join(path, s["file"])
            # a committed shard damaged since (a disk error, a hand edit) would be published as is
            record = fmt.writing_name(part)
            problem = fmt.shard_file_problem(file, s["rows"], header["d_model"], header["dtype"], record)
            if problem:
                raise DataError(
                    f"store {path}: {s['file']}, recorded as written in {os.path.basename(record_path)}, {problem}; "
                    "delete the store's directory and write it again (or write to a new directory)"
                )
            if "crc32" not in s:  # committed by a jumprelu that kept no checksums: take them now
                try:
                    rows = np.load(file, mmap_mode="r")
                except (OSError, ValueError) as e:
                    raise DataError(
                        f"store {path}: {s['file']}, recorded as written in "
                        f"{os.path.basename(record_path)}, cannot be read ({e}); write to a new directory"
                    ) from None
                s["crc32"] = checksum.block_checksums(rows, block_rows)
    elif glob.glob(own_shards_glob(path, part) + ".npy" if part is not None else os.path.join(path, "shard-*.npy")):
        raise DataError(
            f"store {path}: holds shard files but no {fmt.writing_name(part)}; not a store this writer made"
        )
    # Anything beyond the recorded shards is a leftover of the crash: it will be written again.
    # (Only this writer's own files: the other parts of the store belong to other processes.)
    recorded = {s["file"] for s in shards}
    for stray in glob.glob(own_shards_glob(path, part) + ".npy") + glob.glob(own_shards_glob(path, part, ".")):
        if os.path.basename(stray) not in recorded:
            os.remove(stray)
    return shards, complete


def record(path: str, header: dict, shards: list[dict], part: int | None, parts: int | None, complete: bool):
    """Rewrites the record atomically (a crash leaves the previous one)."""
    name = fmt.writing_name(part)
    state = {"header": header, "shards": shards}
    if part is not None:
        state.update(part=part, parts=parts, complete=complete)
    with fmt.writing(path, name):
        fmt.write_json_atomically(os.path.join(path, name), state)


def _read(path: str, record_path: str) -> dict:
    try:
        with open(record_path) as f:
            saved = json.load(f)
        if not (isinstance(saved, dict) and isinstance(saved.get("header"), dict)):
            raise ValueError("not the object a writer records")
        if not isinstance(saved.get("shards"), list):
            raise ValueError("no list of shards")
    except ValueError as e:
        raise _damaged(path, record_path, str(e)) from None
    return saved


def _check_shard(path, record_path, i: int, shard, part, block_rows: int, shard_rows: int) -> None:
    """The one-line 'damaged' error naming the first wrong field of the i-th shard record."""
    # a record without crc32 is from a jumprelu that kept no checksums (taken on resume)
    block_rows = block_rows if isinstance(shard, dict) and "crc32" in shard else None
    problem = metadata.shard_entry_problem(shard, block_rows, max_rows=shard_rows)
    if problem is None:  # what only a progress record holds: its place in the order, the norm sum
        name, sq = fmt.shard_name(i, part), shard.get("sum_sq_norm")
        if shard["file"] != name:
            problem = ".file", repr(name), shard["file"]
        elif not (isinstance(sq, (int, float)) and not isinstance(sq, bool) and math.isfinite(sq) and sq >= 0):
            problem = ".sum_sq_norm", "a finite number >= 0", sq
    if problem:
        field, expected, found = problem
        raise _damaged(path, record_path, f"shards[{i}]{field} must be {expected}, found {found!r}")


def _damaged(path: str, record_path: str, detail: str) -> DataError:
    return DataError(
        f"store {path}: {os.path.basename(record_path)} (the interrupted write's record) is damaged "
        f"({detail}); write to a new directory"
    )
