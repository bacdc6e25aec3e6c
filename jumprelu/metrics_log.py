"""Metrics as JSON lines in the workdir, and the progress bar."""

from __future__ import annotations

import json
import os
import time

from tqdm import tqdm


def atomic_write_text(path: str, text: str) -> None:
    """Writes via a temporary file and a rename, so readers never see half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


class MetricsLog:
    """Appends one JSON object per log step to WORKDIR/metrics.jsonl.

    On resume, records past the restored step (written after the last checkpoint by
    the interrupted run) are dropped first, so the file reads as one clean run.
    """

    def __init__(self, workdir: str, resume_step: int):
        self.path = os.path.join(workdir, "metrics.jsonl")
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._fh = open(self.path, "a")

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class Progress:
    """Steps done, tokens/s and ETA on one line."""

    def __init__(self, total_steps: int, start_step: int, batch_size: int, enabled: bool):
        self.batch_size = batch_size
        self._bar = tqdm(
            total=total_steps, initial=start_step, unit="step", disable=not enabled, dynamic_ncols=True, mininterval=0.5
        )
        self._last_step, self._last_time = start_step, time.perf_counter()

    def update(self, step: int, metrics: dict | None = None) -> float:
        """Moves to `step`; returns tokens/s since the previous call."""
        now = time.perf_counter()
        rate = (step - self._last_step) * self.batch_size / max(now - self._last_time, 1e-9)
        self._bar.update(step - self._last_step)
        self._last_step, self._last_time = step, now
        if metrics is not None:
            self._bar.set_postfix_str(
                f"tok/s={rate:,.0f} loss={metrics['loss']:.4g} L0={metrics['l0']:.1f} fvu={metrics['fvu']:.3f}",
                refresh=False,
            )
        return rate

    def close(self) -> None:
        self._bar.close()
