"""Converting a .npy file into an activation store, and summarising a store."""

from __future__ import annotations

import os
import zlib

import numpy as np

from jumprelu.errors import DataError
from jumprelu.store import checksum
from jumprelu.store import format as fmt
from jumprelu.store.metadata import read_metadata
from jumprelu.store.npy import open_npy
from jumprelu.store.writer import StoreWriter


def input_identity(path: str) -> dict:
    """The .npy's size and CRCs of its first and last MiB: a file regenerated at the same path
    (same shape, other rows) has others, so neither the no-op rerun nor a resume takes it for
    the one converted before."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(1 << 20)
        f.seek(max(0, size - (1 << 20)))
        tail = f.read()
    return dict(size=size, crc32_head=zlib.crc32(head), crc32_tail=zlib.crc32(tail))


def _already_converted(output, rows, dtype, model, site, layer, text_source, shuffle_seed, shard_rows, source):
    """The metadata of `output` if a conversion with these settings already completed there, else None.

    A process killed after metadata.json was written but before it returned is then rerun
    as a no-op (removing the progress file it left), so the same command always finishes.
    """
    if not os.path.exists(os.path.join(output, fmt.METADATA)):
        return None
    meta = read_metadata(output)
    want = dict(d_model=int(rows.shape[1]), dtype=dtype, model=model, site=site, layer=layer)
    want.update(text_source=text_source, shuffle_seed=shuffle_seed, num_rows=int(rows.shape[0]))
    if shard_rows:
        want["shard_rows"] = int(shard_rows)
    if any(meta.get(k) != v for k, v in want.items()):
        return None  # StoreWriter refuses to touch it, saying why
    if (meta.get("extra") or {}).get("input") != source:
        raise DataError(
            f"store {output} was converted from another version of this input (now {source}, then "
            f"{(meta.get('extra') or {}).get('input')}); convert it into a new directory"
        )
    missing = [s["file"] for s in meta["shards"] if not os.path.exists(os.path.join(output, s["file"]))]
    if missing:
        raise DataError(
            f"store {output}: {missing[0]} is missing ({fmt.METADATA} lists {len(meta['shards'])} shards); "
            "convert into a new directory"
        )
    for s in meta["shards"]:  # "nothing to do" was said of a store with a truncated shard
        problem = fmt.shard_file_problem(
            os.path.join(output, s["file"]), s["rows"], meta["d_model"], meta["dtype"], fmt.METADATA
        )
        if problem:
            raise DataError(f"store {output}: {s['file']} {problem}; convert into a new directory")
    leftover = os.path.join(output, fmt.WRITING)
    if os.path.exists(leftover):
        os.remove(leftover)
    return meta


def convert(
    input_path: str,
    output: str,
    *,
    dtype: str = "float32",
    model: str = "",
    site: str = "",
    layer: int | None = None,
    text_source: str = "",
    shuffle_seed: int | None = 0,
    shard_rows: int | None = None,
    log=print,
) -> dict:
    """Writes the rows of a .npy [N, d_model] file into a new store (resuming an interrupted one).

    shuffle_seed: the seed of the shuffle within each shard; None keeps the input order.
    """
    rows = open_npy(input_path)
    source = input_identity(input_path)
    done = _already_converted(output, rows, dtype, model, site, layer, text_source or os.path.abspath(input_path),
                              shuffle_seed, shard_rows, source)  # fmt: skip
    if done is not None:
        log(f"{output} already holds these {rows.shape[0]} rows; nothing to do")
        return done
    writer = StoreWriter(
        output,
        d_model=int(rows.shape[1]),
        dtype=dtype,
        model=model,
        site=site,
        layer=layer,
        text_source=text_source or os.path.abspath(input_path),
        shuffle_seed=shuffle_seed,
        shard_rows=shard_rows,
        extra={"input": source},  # a resume refuses another version of the input (the header must match)
    )
    start = writer.rows_written
    if start:
        log(f"resuming: {start} of {rows.shape[0]} rows already in complete shards")
    chunk = max(1, (64 << 20) // (rows.shape[1] * rows.dtype.itemsize))
    for begin in range(start, rows.shape[0], chunk):
        writer.append(np.asarray(rows[begin : begin + chunk]))
    return writer.close()


# a summary said nothing of how much it had checked, and a store with a flipped byte read as fine
_CHECKED = {
    True: ": every block checked",
    False: f": up to {checksum.START_SAMPLE_BLOCKS} sampled blocks checked (--verify reads every row)",
    None: "",
}


def summary(store, verified: bool | None = None) -> dict:
    """What a (validated) store holds, as a flat dict of printable values; `verified`: whether every
    block's checksum was read (True), a sample of them as a training start does (False), or the
    store was just written (None)."""
    meta = store.metadata
    files = [os.path.join(store.path, s["file"]) for s in meta["shards"]]
    return {
        "path": os.path.abspath(store.path),
        "format_version": meta["format_version"],
        "model": meta["model"],
        "site": meta["site"],
        "layer": meta["layer"],
        "text_source": meta["text_source"],
        "d_model": store.d_model,
        "dtype": store.dtype,
        "num_rows": store.num_rows,
        "shards": len(files),
        "rows_per_shard": sorted(set(store.shard_rows)),
        "bytes": sum(os.path.getsize(f) for f in files),
        "scale": store.scale,
        "nonfinite_rows": int(sum(len(b) for b in store.bad_rows)),
        "checksums": (
            f"crc32 per {meta['checksum']['block_rows']} rows{_CHECKED[verified]}"
            if store.checksummed
            else "none (format 1, unverified)"
        ),
        "shuffled_within_shards": meta["shuffle_seed"] is not None,
        "created": meta.get("created"),
    }
