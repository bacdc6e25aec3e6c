"""Store commands.

  python -m jumprelu.store convert ACTS.npy STORE_DIR [--dtype bfloat16] [--model ...] [--site ...]
  python -m jumprelu.store summary STORE_DIR [--verify] [--json]

`convert` resumes where an interrupted conversion stopped: run the same command again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from jumprelu.data.npy import open_npy
from jumprelu.errors import DataError
from jumprelu.store.reader import open_store
from jumprelu.store.writer import StoreWriter


def convert(args) -> dict:
    rows = open_npy(args.input)
    writer = StoreWriter(
        args.output,
        d_model=int(rows.shape[1]),
        dtype=args.dtype,
        model=args.model,
        site=args.site,
        layer=args.layer,
        text_source=args.text_source or os.path.abspath(args.input),
        shuffle_seed=None if args.no_shuffle else args.seed,
        shard_rows=args.shard_rows,
    )
    start = writer.rows_written
    if start:
        print(f"resuming: {start} of {rows.shape[0]} rows already in complete shards")
    chunk = max(1, (64 << 20) // (rows.shape[1] * rows.dtype.itemsize))
    for begin in range(start, rows.shape[0], chunk):
        writer.append(np.asarray(rows[begin : begin + chunk]))
    return writer.close()


def summary(store) -> dict:
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
        "shuffled_within_shards": meta["shuffle_seed"] is not None,
        "created": meta.get("created"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jumprelu.store", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="write a .npy [N, d_model] file into a new store")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    c.add_argument("--model", default="")
    c.add_argument("--site", default="")
    c.add_argument("--layer", type=int, default=None)
    c.add_argument("--text_source", default="")
    c.add_argument("--shard_rows", type=int, default=None, help="rows per shard (default: about 256 MiB)")
    c.add_argument("--seed", type=int, default=0, help="seed of the shuffle within each shard")
    c.add_argument("--no_shuffle", action="store_true", help="keep the input order within shards")
    s = sub.add_parser("summary", help="validate a store and print what it holds")
    s.add_argument("store")
    s.add_argument("--verify", action="store_true", help="re-read every row to count NaN/Inf")
    s.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            convert(args)
            out = summary(open_store(args.output, nonfinite="drop"))
        else:
            out = summary(open_store(args.store, nonfinite="drop", verify=args.verify))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(out, indent=1))
    else:
        width = max(map(len, out))
        print("\n".join(f"{k:<{width}}  {v}" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
