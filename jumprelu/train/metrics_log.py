"""Metrics as JSON lines in the workdir, and the progress bar."""

from __future__ import annotations

import json
import time

from tqdm import tqdm

from jumprelu import fs


def read_metrics(path: str) -> list[dict]:
    if not fs.exists(path):
        return []
    return [json.loads(line) for line in fs.read_text(path).splitlines() if line.strip()]


class MetricsLog:
    """Appends one JSON object per log step to WORKDIR/metrics.jsonl.

    On resume, records past the restored step (written after the last checkpoint by
    the interrupted run) are dropped first, so the file reads as one clean run.
    """

    def __init__(self, workdir: str, resume_step: int):
        self.path = fs.join(workdir, "metrics.jsonl")
        self._lines = [json.dumps(r) + "\n" for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        fs.write_text_atomically(self.path, "".join(self._lines))
        # Objects in a bucket cannot be appended to: a remote log is rewritten whole at each write.
        self._fh = None if fs.is_remote(self.path) else open(self.path, "a")

    def write(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if self._fh is None:
            self._lines.append(line)
            fs.write_text_atomically(self.path, "".join(self._lines))
            return
        self._fh.write(line)
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
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
