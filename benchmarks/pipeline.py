"""Activation store + Grain pipeline throughput against raw disk reads and the train step; prints JSON.

  python benchmarks/pipeline.py --gib 3 --d-model 2304 --batch 4096 --width 16384

In one run it (1) writes a store of about `--gib` GiB of random rows with `StoreWriter`
(or reuses one in --dir), (2) reads the shard files sequentially with plain `readinto`
(the raw bandwidth), (3) drains one epoch through the training pipeline (BatchStream +
Grain iterator, the same code `train` uses) and (4) times the compiled train step at the
same batch to get the rows/s it consumes. Reads are measured twice: "cold", after
evicting the files from the page cache with posix_fadvise(DONTNEED), and "warm".
Goals: pipeline ≥ 70% of raw bandwidth, and ≥ 3× what the step consumes.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from jumprelu.config import base_config
from jumprelu.data import make_stream, pipeline
from jumprelu.store import StoreWriter, open_store
from jumprelu.store import format as store_format
from jumprelu.train import program, sharding
from jumprelu.train import state as state_lib


def write_store(path: str, gib: float, d_model: int, dtype: str) -> float:
    """Writes random rows; returns the writer's MB/s, fsyncs included (0 if the store already exists)."""
    if os.path.exists(os.path.join(path, store_format.METADATA)):
        return 0.0
    itemsize = store_format.file_dtype(dtype).itemsize
    rows = int(gib * (1 << 30)) // (d_model * itemsize)
    writer = StoreWriter(path, d_model=d_model, dtype=dtype, model="random", text_source="benchmarks/pipeline.py")
    rng = np.random.default_rng(0)
    chunk = 16384
    pool = [rng.standard_normal((chunk, d_model), dtype=np.float32) for _ in range(4)]  # generated outside the timing
    t0 = time.perf_counter()
    for i, start in enumerate(range(writer.rows_written, rows, chunk)):
        writer.append(pool[i % len(pool)][: rows - start])
    writer.close()
    return rows * d_model * itemsize / (time.perf_counter() - t0) / 1e6


def shard_files(store) -> list[str]:
    return [os.path.join(store.path, s["file"]) for s in store.metadata["shards"]]


def evict(files: list[str]) -> None:
    """Drops the files' pages from the page cache (they must not be mapped)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def raw_read_mb_s(files: list[str]) -> float:
    buf = bytearray(16 << 20)
    total, t0 = 0, time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return total / (time.perf_counter() - t0) / 1e6


def pipeline_rate(path: str, data_cfg, batch: int, cold: bool) -> dict:
    """Drains one epoch's worth of batches from a freshly opened store through the Grain iterator."""
    store = open_store(path)
    if cold:
        evict(shard_files(store))
    stream = make_stream(data_cfg, store)
    batches = stream.num_train_rows // batch
    it = pipeline.batch_iterator(
        stream,
        batch_size=batch,
        part=slice(None),
        num_batches=batches,
        read_threads=data_cfg.read_threads,
        prefetch_batches=data_cfg.prefetch_batches,
    )
    t0 = time.perf_counter()
    nbytes = sum(next(it).nbytes for _ in range(batches))
    dt = time.perf_counter() - t0
    return {"rows_per_s": batches * batch / dt, "mb_per_s": nbytes / dt / 1e6, "batches": batches, "seconds": dt}


def step_rows_per_s(d_model: int, width: int, batch: int, dtype: str, repeats: int) -> dict:
    cfg = base_config()
    cfg.sae.width, cfg.train.batch_size = width, batch
    mesh = sharding.make_mesh(cfg.mesh)
    prog = program.build(cfg, d_model, mesh, batch_dtype=dtype)
    state = state_lib.create_state(prog.model, prog.tx, mesh, jax.random.key(0), 1.0)
    x = np.random.default_rng(1).standard_normal((batch, d_model), np.float32).astype(store_format.numpy_dtype(dtype))
    x = jax.device_put(x, prog.batch_sharding)
    state, m = prog.step(state, x)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, m = prog.step(state, x)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return {"ms_per_step": 1e3 * float(np.median(times)), "rows_per_s": batch / float(np.median(times))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/jumprelu_pipeline_bench")
    p.add_argument("--gib", type=float, default=3.0)
    p.add_argument("--d-model", type=int, default=2304)  # Gemma 2 2B residual width
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--width", type=int, default=16384)
    p.add_argument("--read-threads", type=int, default=None, help="default: the config's data.read_threads")
    p.add_argument("--step-repeats", type=int, default=3)
    args = p.parse_args()

    path = os.path.join(args.dir, f"d{args.d_model}_{args.dtype}_{args.gib:g}gib")
    write_mb_s = write_store(path, args.gib, args.d_model, args.dtype)
    store = open_store(path)
    files = shard_files(store)
    data_cfg = base_config().data
    if args.read_threads is not None:
        data_cfg.read_threads = args.read_threads
    del store

    evict(files)
    raw_cold = raw_read_mb_s(files)
    raw_warm = raw_read_mb_s(files)
    pipe_cold = pipeline_rate(path, data_cfg, args.batch, cold=True)
    pipe_warm = pipeline_rate(path, data_cfg, args.batch, cold=False)
    step = step_rows_per_s(args.d_model, args.width, args.batch, args.dtype, args.step_repeats)
    result = {
        "store": {
            "path": path,
            "bytes": sum(os.path.getsize(f) for f in files),
            "shards": len(files),
            "d_model": args.d_model,
            "dtype": args.dtype,
            "writer_mb_per_s": round(write_mb_s, 1) if write_mb_s else "reused",
        },
        "raw_read_mb_per_s": {"cold": round(raw_cold), "warm": round(raw_warm)},
        "pipeline": {
            "read_threads": data_cfg.read_threads,
            "prefetch_batches": data_cfg.prefetch_batches,
            "block_bytes": data_cfg.block_bytes,
            "cold": {k: round(v, 2) for k, v in pipe_cold.items()},
            "warm": {k: round(v, 2) for k, v in pipe_warm.items()},
            "fraction_of_raw": {
                "cold": round(pipe_cold["mb_per_s"] / raw_cold, 3),
                "warm": round(pipe_warm["mb_per_s"] / raw_warm, 3),
            },
        },
        "train_step": {"width": args.width, "batch": args.batch, "device": str(jax.devices()[0].platform), **step},
        "pipeline_over_step": {
            "cold": round(pipe_cold["rows_per_s"] / step["rows_per_s"], 1),
            "warm": round(pipe_warm["rows_per_s"] / step["rows_per_s"], 1),
        },
        "cpu_count": os.cpu_count(),
        "command": "python benchmarks/pipeline.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
