"""Writing metadata.json, the file that makes a store complete: after one writer's `close`, or
once every process of a multi-process write has finished its part (`commit_parts`).

A store without metadata.json is incomplete and no reader opens it, so this file is written
last, atomically, and only from shards that are already fsynced and recorded.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import json
import os

import numpy as np

from jumprelu.errors import DataError
from jumprelu.store import checksum
from jumprelu.store import format as fmt


def _scale(shards: list[dict]) -> tuple[float, str | None]:
    """C over the finite rows of `shards`, and why there is none (None when there is)."""
    finite = sum(s["rows"] - len(s["nonfinite_rows"]) for s in shards)
    total_sq = sum(s["sum_sq_norm"] for s in shards)
    scale = float(np.sqrt(total_sq / finite)) if finite else float("nan")
    if np.isfinite(scale) and scale > 0:
        return scale, None
    if not finite:
        rows = sum(s["rows"] for s in shards)
        return scale, f"all {rows} rows are non-finite (NaN or Inf, or too large for the store's dtype)"
    if total_sq == 0:
        return scale, f"all {finite} finite rows are zero"
    return scale, f"the mean squared norm of its {finite} finite rows overflows ({scale**2})"


def unscalable(path: str, shards: list[dict]) -> DataError | None:
    """The error of a store whose rows give no scale C (all non-finite or zero): no reader could
    train on them, and a rerun would resume and end the same way."""
    return _unscalable_error(path, _scale(shards)[1])


def _unscalable_error(path: str, why: str | None) -> DataError | None:
    if why is None:
        return None
    return DataError(f"store {path}: cannot compute the scale C: {why}; these activations cannot be trained on")


def remove_files(path: str, names: list[str]) -> None:
    """Removes what a write that can never complete made (shards, progress records), missing ones skipped."""
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, name))


def build_metadata(path: str, header: dict, shards: list[dict], block_rows: int) -> dict:
    """metadata.json of a store whose complete shards are `shards` (C over all their finite rows)."""
    scale, why = _scale(shards)
    if why is not None:
        raise _unscalable_error(path, why)
    return {
        "format": fmt.FORMAT,
        "format_version": fmt.FORMAT_VERSION,
        **header,
        "num_rows": sum(s["rows"] for s in shards),
        "scale": scale,  # C with E‖x/C‖² = 1 over all finite rows
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "checksum": {"algorithm": checksum.ALGORITHM, "block_rows": block_rows},
        "shards": [
            {"file": s["file"], "rows": s["rows"], "nonfinite_rows": s["nonfinite_rows"], "crc32": s["crc32"]}
            for s in shards
        ],
    }


def write_metadata(path: str, header: dict, shards: list[dict], block_rows: int) -> dict:
    """Build metadata.json from the complete `shards` and write it atomically; returns it."""
    metadata = build_metadata(path, header, shards, block_rows)
    with fmt.writing(path, fmt.METADATA):
        try:
            fmt.write_json_atomically(os.path.join(path, fmt.METADATA), metadata, exclusive=True)
        except FileExistsError:  # never replaced: the rows another writer committed stay the store's
            raise DataError(
                f"store {path}: another writer completed this store ({fmt.METADATA} appeared) while this one "
                "was writing; its shards are not the store's: write to a new directory"
            ) from None
    return metadata


def commit_parts(path: str, parts: int) -> dict:
    """metadata.json of a store that `parts` processes wrote as parts 0..parts-1; returns it.

    Called by one process after every part's writer closed (a barrier). Every part must be
    there and complete, all with the same header, and no part of another process count may
    be left over: otherwise a one-line DataError, and nothing is written.
    """
    if os.path.exists(os.path.join(path, fmt.METADATA)):
        raise DataError(f"store {path} is already complete ({fmt.METADATA} exists)")
    found = sorted(glob.glob(os.path.join(path, fmt.PART_WRITING_GLOB)))
    expected = [fmt.writing_name(k) for k in range(parts)]
    if [os.path.basename(f) for f in found] != expected:
        raise DataError(
            f"store {path}: expected the progress files of parts 0..{parts - 1} ({', '.join(expected)}), "
            f"found {[os.path.basename(f) for f in found]}; every process must write to one shared "
            "directory, with the same number of processes as the write started with"
        )
    records = []
    for name in expected:
        with open(os.path.join(path, name)) as f:
            records.append(json.load(f))
    for k, record in enumerate(records):
        if not record.get("complete"):
            raise DataError(f"store {path}: part {k} is not complete ({expected[k]}); run every process again")
        if record["header"] != records[0]["header"]:
            raise DataError(f"store {path}: part {k} was written with another header than part 0")
    shards = [s for record in records for s in record["shards"]]
    if not shards:
        raise DataError(f"store {path}: no rows were written")
    if (error := unscalable(path, shards)) is not None:  # as one writer's close: no part could ever commit
        remove_files(path, [s["file"] for s in shards] + expected)
        raise DataError(f"{error}; the shards written are removed")
    header = records[0]["header"]
    row_bytes = header["d_model"] * fmt.file_dtype(header["dtype"]).itemsize
    # how many processes wrote it: which sequences each part holds (jumprelu/harvest/contexts.py)
    metadata = write_metadata(path, dict(header, parts=parts), shards, checksum.block_rows(row_bytes))
    for name in expected:  # metadata.json is the truth from here on: progress files are leftovers
        os.remove(os.path.join(path, name))
    return metadata
