"""Metrics as JSON lines in the workdir, and the progress bar."""

from __future__ import annotations

import json
import logging
import math
import os
import time

import numpy as np
from tqdm import tqdm

from jumprelu import fs

log = logging.getLogger("jumprelu")


def _finite(value):
    """`value` with every NaN or ±Inf float (at any depth) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def dumps(value, **kwargs) -> str:
    """JSON that strict parsers read (jq, JavaScript, pandas' JSON lines): a non-finite number, such
    as the loss of a batch that diverged, is written as null; Python's NaN/Infinity are not JSON."""
    return json.dumps(_finite(value), allow_nan=False, **kwargs)


def _parse(text: str) -> tuple[list[dict], int]:
    """(records, lines dropped): a line that is not a JSON object is a write cut short (full disk, crash)."""
    records, dropped = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            dropped += 1
    return records, dropped


def read_metrics(path: str) -> list[dict]:
    if not fs.exists(path):
        return []
    return _parse(fs.read_text(path))[0]


class MetricsLog:
    """Appends one JSON object per log step to WORKDIR/metrics.jsonl.

    On resume, records past the restored step (written after the last checkpoint by
    the interrupted run) are dropped first, so the file reads as one clean run, and so is
    a torn line (half a record, left by a full disk or a crash), with a warning.

    A write that fails (a full disk) never stops training and never leaves half a line:
    the file is cut back to its last whole line and the records wait in memory until a
    later write succeeds (a warning says so; `close` says if some never could be written).
    """

    def __init__(self, workdir: str, resume_step: int):
        self.path = fs.join(workdir, "metrics.jsonl")
        records, dropped = _parse(fs.read_text(self.path)) if fs.exists(self.path) else ([], 0)
        if dropped:
            log.warning("%s: dropped %d unreadable line(s), the remains of an interrupted write", self.path, dropped)
        self._lines = [dumps(r) + "\n" for r in records if r.get("step", 0) <= resume_step]
        fs.write_text_atomically(self.path, "".join(self._lines))
        self._pending: list[str] = []
        self._failing = False
        # Objects in a bucket cannot be appended to: a remote log is rewritten whole at each write.
        self._fd = None if fs.is_remote(self.path) else os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def write(self, record: dict) -> None:
        self._pending.append(dumps(record) + "\n")
        self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        try:
            if self._fd is None:
                fs.write_text_atomically(self.path, "".join(self._lines + self._pending))
            else:
                self._append("".join(self._pending).encode())
        except OSError as e:
            if not self._failing:
                log.warning(
                    "%s: cannot write (%s); keeping the records in memory until a write succeeds",
                    self.path,
                    e.strerror or e,
                )
            self._failing = True
            return
        self._lines += self._pending
        self._pending = []
        self._failing = False

    def _append(self, data: bytes) -> None:
        good = os.fstat(self._fd).st_size
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError:
            try:  # never leave half a line: whatever of it reached the file goes
                os.ftruncate(self._fd, good)
            except OSError:
                pass  # then the next start drops the torn line (see __init__)
            raise

    def close(self) -> None:
        self._flush()
        if self._pending:
            log.warning("%s: %d records could not be written", self.path, len(self._pending))
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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


class IntervalMean:
    """The mean of one per-step metric over the steps since the last log, summed on the device.

    For `sparse_step` (1 when the sparse JumpReLU step ran, 0 when the batch overflowed its capacity
    and took the dense one): a logged value is the share of the steps since the previous log that
    ran sparse, so every dense fallback is counted, not only those that fall on a logged step.
    Stacked runs sum each member's value (the metric's leading axis) separately.
    """

    def __init__(self, key: str):
        self.key = key
        self.total = None  # a device array: no transfer, no sync between logs
        self.steps = 0

    def add(self, metrics: dict) -> None:
        if self.key in metrics:
            value = metrics[self.key]
            self.total = value if self.total is None else self.total + value
            self.steps += 1

    def pop_into(self, host: dict) -> dict:
        """host (the logged step's metrics, fetched) with the key's value replaced by the interval's mean."""
        if self.total is not None:
            host = dict(host, **{self.key: np.asarray(self.total) / self.steps})
        self.total, self.steps = None, 0
        return host
