"""What the real-data benchmarks share: turning the shared .npy into a store, and running one config."""

from __future__ import annotations

import hashlib
import json
import os
import time

from jumprelu import fs
from jumprelu.store import open_store
from jumprelu.store.convert import convert


def ensure_store(data: str, out_dir: str) -> str:
    """A store directory for `data`: itself if it is one, else OUT/store converted from the .npy (once)."""
    if os.path.isdir(data):
        open_store(data)  # validates; one-line error if it is not a store
        return data
    if not data.endswith(".npy"):
        raise SystemExit(f"--data {data}: expected an activation store directory or a .npy file")
    if not os.path.isfile(data):
        raise SystemExit(f"--data {data}: no such file")
    store_dir = os.path.join(out_dir, "store")
    # (a no-op when it holds this .npy already; refused when it was made from another version of it)
    convert(data, store_dir, log=lambda *_: None)
    return store_dir


def config_hash(cfg) -> str:
    """8 hex digits of a run's whole config: a rerun with other settings is another directory."""
    return hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:8]


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
    # the timing, for reruns of the benchmark (atomically: a crash leaves the library's report)
    fs.write_text_atomically(report_path, json.dumps(report, indent=2))
    return report
