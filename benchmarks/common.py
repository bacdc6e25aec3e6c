"""What the real-data benchmarks share: turning the shared .npy into a store, and running one config."""

from __future__ import annotations

import json
import os
import time

from jumprelu.store import open_store
from jumprelu.store.convert import convert


def ensure_store(data: str, out_dir: str) -> str:
    """A store directory for `data`: itself if it is one, else OUT/store converted from the .npy (once)."""
    if os.path.isdir(data):
        open_store(data)  # validates; one-line error if it is not a store
        return data
    if not data.endswith(".npy"):
        raise SystemExit(f"--data {data}: expected an activation store directory or a .npy file")
    store_dir = os.path.join(out_dir, "store")
    if not os.path.exists(os.path.join(store_dir, "metadata.json")):  # absent or interrupted: (re)write
        convert(data, store_dir)
    return store_dir


def train_run(cfg, workdir: str) -> dict:
    """Trains cfg in workdir (or reads its finished report) and returns the report plus seconds."""
    report_path = os.path.join(workdir, "report.json")
    if os.path.exists(report_path):
        with open(report_path) as f:
            report = json.load(f)
        report.setdefault("seconds", None)
        return report
    from jumprelu.train import loop  # late: argument errors show before jax starts

    t0 = time.perf_counter()
    report = loop.train(cfg, workdir)
    report["seconds"] = time.perf_counter() - t0
    with open(report_path, "w") as f:  # add the timing for reruns of the benchmark
        json.dump(report, f, indent=2)
    return report
