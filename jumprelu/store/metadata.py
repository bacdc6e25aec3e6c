"""Reading metadata.json: format, version and the type of every field, before any shard is touched.

metadata.json is the one file a reader trusts for shapes, row counts and checksums, so a
value of the wrong type (a hand edit, another tool's output) is a one-line `DataError`
naming the field, not a TypeError deep inside training.
"""

from __future__ import annotations

import glob
import json
import math
import os

from jumprelu.errors import DataError
from jumprelu.store import checksum
from jumprelu.store import format as fmt


def fail(path: str, message: str):
    raise DataError(f"store {path}: {message}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _incomplete(path: str):
    """The error for a directory without metadata.json: an interrupted write, or not a store."""
    progress = os.path.join(path, fmt.WRITING)
    if os.path.exists(progress):
        try:
            with open(progress) as f:
                done = json.load(f)["shards"]
            last = done[-1]["file"] if done else "none"  # a list of shard records, as the writer keeps it
            if not (isinstance(done, list) and isinstance(last, str)):
                raise TypeError(f"shards is {type(done).__name__} of {type(done[-1]).__name__ if done else '-'}")
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            fail(path, f"incomplete, and its {fmt.WRITING} is unreadable ({e}); write the store again")
        in_flight = sorted(glob.glob(os.path.join(path, ".shard-*.tmp")))
        flight = f"; {os.path.basename(in_flight[0])[1:-4]} was being written" if in_flight else ""
        fail(
            path,
            f"incomplete: the writer stopped after {len(done)} complete shards (last: {last}){flight}; "
            "run the writer again on this directory to resume",
        )
    parts = sorted(glob.glob(os.path.join(path, fmt.PART_WRITING_GLOB)))
    if parts:  # a multi-process write (jumprelu.store.commit.commit_parts writes metadata.json at its end)
        fail(
            path,
            f"incomplete: a write by several processes is in progress ({len(parts)} part progress files, "
            f"{', '.join(os.path.basename(p) for p in parts)}); run every process again to resume",
        )
    fail(path, f"not an activation store ({fmt.METADATA} missing)")


def _check_types(path: str, meta: dict) -> None:
    def check(ok: bool, field: str, expected: str, found) -> None:
        if not ok:
            fail(path, f"{fmt.METADATA} field {field} must be {expected}, found {found!r}")

    check(_is_int(meta["d_model"]) and meta["d_model"] > 0, "d_model", "a positive integer", meta["d_model"])
    check(meta["dtype"] in fmt.DTYPES, "dtype", f"one of {fmt.DTYPES}", meta["dtype"])
    for field in ("model", "site", "text_source"):
        check(isinstance(meta[field], str), field, "a string", meta[field])
    for field in ("layer", "shuffle_seed"):
        check(meta[field] is None or _is_int(meta[field]), field, "an integer or null", meta[field])
    check(_is_int(meta["num_rows"]) and meta["num_rows"] > 0, "num_rows", "a positive integer", meta["num_rows"])
    scale = meta["scale"]
    ok = isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0
    check(ok, "scale", "a finite number > 0", scale)
    shards = meta["shards"]
    check(isinstance(shards, list) and len(shards) > 0, "shards", "a non-empty list", shards)
    versioned = meta["format_version"] >= 2
    if versioned:
        c = meta.get("checksum")
        ok = isinstance(c, dict) and c.get("algorithm") == checksum.ALGORITHM
        check(ok, "checksum", f"an object with algorithm {checksum.ALGORITHM!r} and block_rows", c)
        check(_is_int(c.get("block_rows")) and c["block_rows"] > 0, "checksum.block_rows", "a positive integer", c)
    block_rows = meta["checksum"]["block_rows"] if versioned else None
    for i, s in enumerate(shards):
        problem = shard_entry_problem(s, block_rows)
        if problem:
            field, expected, found = problem
            check(False, f"shards[{i}]{field}", expected, found)


def shard_entry_problem(s, block_rows: int | None, max_rows: int | None = None) -> tuple[str, str, object] | None:
    """(".field", what it must be, what was found) for the first wrong field of one shard record,
    or None. The same record is in metadata.json and in a write's progress file; block_rows None
    (a store older than checksums) leaves crc32 unchecked, max_rows (the writer's shard_rows) bounds rows."""
    if not isinstance(s, dict):
        return "", "an object", s
    file = s.get("file")
    # A plain file name: the reader opens path/file and must never leave the store's directory.
    ok = isinstance(file, str) and file.endswith(".npy") and os.path.basename(file) == file and file[0] != "."
    if not ok:
        return ".file", "a shard file name like 'shard-00000.npy'", file
    rows = s.get("rows")
    if not (_is_int(rows) and rows >= 0 and (max_rows is None or rows <= max_rows)):
        bound = f" and <= {max_rows}" if max_rows is not None else ""
        return ".rows", f"an integer >= 0{bound}", rows
    bad = s.get("nonfinite_rows")
    if not (isinstance(bad, list) and all(_is_int(r) and 0 <= r < rows for r in bad)):
        return ".nonfinite_rows", f"a list of row indices in [0, {rows})", bad
    if block_rows is not None:
        n = len(checksum.block_ranges(rows, block_rows))
        crcs = s.get("crc32")
        if not (isinstance(crcs, list) and len(crcs) == n and all(_is_int(v) and 0 <= v < 1 << 32 for v in crcs)):
            return ".crc32", f"a list of {n} CRC-32 values (one per block)", crcs
    return None


def read_metadata(path: str) -> dict:
    """metadata.json of the store at `path`, checked (format, version, fields), without touching shards."""
    if os.path.isfile(path):  # was "no such directory" for an .npy of activations
        hint = " (convert an .npy with `jumprelu store convert`)" if path.endswith(".npy") else ""
        fail(path, f"is a file; a store is a directory{hint}")
    if not os.path.isdir(path):
        fail(path, "no such directory")
    meta_file = os.path.join(path, fmt.METADATA)
    if not os.path.exists(meta_file):
        _incomplete(path)
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        fail(path, f"{fmt.METADATA} is not readable JSON ({e})")
    if not isinstance(meta, dict):
        fail(path, f"{fmt.METADATA} must hold a JSON object, found {type(meta).__name__}")
    if meta.get("format") != fmt.FORMAT:
        fail(path, f"{fmt.METADATA} field format must be {fmt.FORMAT!r}, found {meta.get('format')!r}")
    if meta.get("format_version") not in fmt.READABLE_VERSIONS:
        fail(
            path,
            f"{fmt.METADATA} has format_version {meta.get('format_version')!r}; "
            f"this jumprelu reads versions {', '.join(map(str, fmt.READABLE_VERSIONS))}",
        )
    for field in (*fmt.HEADER_FIELDS, "num_rows", "scale", "shards"):
        if field not in meta:
            fail(path, f"{fmt.METADATA} lacks the field {field!r}")
    _check_types(path, meta)
    if sum(s["rows"] for s in meta["shards"]) != meta["num_rows"]:
        fail(path, f"{fmt.METADATA}: num_rows {meta['num_rows']} is not the sum of the shards' rows")
    return meta
