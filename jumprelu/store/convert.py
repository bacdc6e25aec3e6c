"""Converting a .npy file into an activation store, and summarising a store."""

from __future__ import annotations

import os

import numpy as np

from jumprelu.store.npy import open_npy
from jumprelu.store.writer import StoreWriter


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
    )
    start = writer.rows_written
    if start:
        log(f"resuming: {start} of {rows.shape[0]} rows already in complete shards")
    chunk = max(1, (64 << 20) // (rows.shape[1] * rows.dtype.itemsize))
    for begin in range(start, rows.shape[0], chunk):
        writer.append(np.asarray(rows[begin : begin + chunk]))
    return writer.close()


def summary(store) -> dict:
    """What a (validated) store holds, as a flat dict of printable values."""
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
            f"crc32 per {meta['checksum']['block_rows']} rows" if store.checksummed else "none (format 1, unverified)"
        ),
        "shuffled_within_shards": meta["shuffle_seed"] is not None,
        "created": meta.get("created"),
    }
