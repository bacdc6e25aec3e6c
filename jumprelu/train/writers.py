"""Where training metrics go: one writer interface, three back-ends.

  JSONL        WORKDIR/metrics.jsonl (jumprelu.train.metrics_log.MetricsLog): one JSON object per
               log step; on resume, records past the restored step are dropped first. Always on.
  TensorBoard  event files in WORKDIR (tensorboardX: no TensorFlow), `log.tensorboard` (default
               on): `tensorboard --logdir WORKDIR`. A resumed run starts its event file with a
               purge at the restored step, so TensorBoard drops what the interrupted run logged
               after its last checkpoint and no step appears twice.
  wandb        `log.wandb_project=NAME` (pip install 'jumprelu[wandb]'); one wandb run per
               SAE, whose id is fixed by the workdir, so a resumed run continues it
               (`wandb_writer.py`).

Every log step writes the scalars of metrics.jsonl; at every checkpoint the held-out rows'
`eval/*` scalars and firing histogram are written (`jumprelu/train/held_out.py`); the config goes
in once as hyperparameters. Multi-host: only process 0 writes.

gs:// workdirs: objects cannot be appended to. The JSONL back-end keeps the records in memory
and rewrites metrics.jsonl at each checkpoint and at the end, not at every log step; TensorBoard
starts a new event file at each checkpoint (TensorBoard reads every file of the directory), so
no object is rewritten from the start of the run.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import time

import numpy as np

from jumprelu import fs
from jumprelu.config_shape import flat_fields
from jumprelu.train import metrics_log
from jumprelu.train.metrics_log import MetricsLog, read_metrics

log = logging.getLogger("jumprelu")
_FILE_COUNT = itertools.count(1)


class MetricWriter:
    """The interface: every method may be called on any process; only the lead's writers write."""

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None: ...

    def write_eval(self, step: int, scalars: dict[str, float]) -> None:
        """Held-out metrics at a checkpoint (metrics.jsonl leaves them to report.json)."""
        self.write_scalars(step, scalars)

    def write_histogram(self, step: int, name: str, values: np.ndarray) -> None: ...

    def write_hparams(self, config: dict) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class JsonlWriter(MetricWriter):
    """metrics.jsonl: through MetricsLog locally; buffered and rewritten at each flush on gs://."""

    def __init__(self, logdir: str, resume_step: int):
        self.path = fs.join(logdir, "metrics.jsonl")
        self._remote = fs.is_remote(logdir)
        if self._remote:
            self._lines = [
                metrics_log.dumps(r) + "\n" for r in read_metrics(self.path) if r.get("step", 0) <= resume_step
            ]
            self._dirty = True
            self.flush()
        else:
            self._log = MetricsLog(logdir, resume_step=resume_step)

    def write_scalars(self, step, scalars):
        record = {"step": step, **scalars}
        if self._remote:
            self._lines.append(metrics_log.dumps(record) + "\n")
            self._dirty = True
        else:
            self._log.write(record)

    def write_eval(self, step, scalars):
        pass  # the training log only; the held-out evaluation is in report.json

    def flush(self):
        if self._remote and self._dirty:
            fs.write_text_atomically(self.path, "".join(self._lines))
            self._dirty = False

    def close(self):
        if self._remote:
            self.flush()
        else:
            self._log.close()


def flat_hparams(config: dict) -> dict:
    """{"sae.width": 64, ...}: scalars as they are, anything else (tuples, None) as a string."""
    return {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in flat_fields(config).items()}


def _until_a_write_fails(method):
    """A TensorBoard write that fails (a full disk) ends TensorBoard logging for this run with one
    warning, as metrics.jsonl and the checkpoints go on: the run is not lost for its event files."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if self._failed:
            return None
        try:
            return method(self, *args, **kwargs)
        except OSError as e:
            self._failed = True
            log.warning(
                "TensorBoard events in %s: cannot write (%s); no more TensorBoard events this run "
                "(metrics.jsonl keeps every record; a resumed run writes a new event file)",
                self.logdir,
                e.strerror or e,
            )
            if self._events is not None:
                with contextlib.suppress(Exception):
                    self._events.close()
                self._events = None
            return None

    return guarded


class TensorBoardWriter(MetricWriter):
    """TensorBoard event files in `logdir`, written synchronously with tensorboardX's record writer.

    (tensorboardX's SummaryWriter queues events to a thread whose flush is no barrier: what a
    checkpoint flushed could still be missing after a crash.) Locally each log step is flushed
    to the file at once; on gs:// the file is uploaded whole at each flush, so the writer starts
    a new file after each one.
    """

    def __init__(self, logdir: str, resume_step: int):
        self.logdir = logdir
        self._remote = fs.is_remote(logdir)
        # also from step 0: a run killed before its first checkpoint left steps the rerun logs again
        self._purge = resume_step + 1
        self._events = None
        self._failed = False

    def _write(self, step: int, summary=None, **fields) -> None:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.record_writer import directory_check

        if self._events is None:
            if self._remote:
                try:
                    import google.cloud.storage  # noqa: F401  tensorboardX's gs:// writer
                except ImportError:
                    from jumprelu.errors import ConfigError

                    raise ConfigError(
                        f"config field log.tensorboard is true but {self.logdir} needs google-cloud-storage: "
                        "pip install 'jumprelu[tpu]', or --config.log.tensorboard=False"
                    ) from None
            directory_check(self.logdir)
            # File names hold the time in seconds: pid and count keep two files of one second apart.
            self._events = EventsWriter(fs.join(self.logdir, "events"), f".{os.getpid()}.{next(_FILE_COUNT):06d}")
            if self._purge is not None:  # TensorBoard drops every event of earlier files at steps >= this
                self._events.write_event(Event(step=self._purge, session_log=SessionLog(status=SessionLog.START)))
                self._purge = None
        self._events.write_event(Event(step=step, wall_time=time.time(), summary=summary, **fields))

    @_until_a_write_fails
    def write_scalars(self, step, scalars):
        from tensorboardX import summary

        for name, value in scalars.items():
            self._write(step, summary.scalar(name, float(value)))
        if not self._remote:
            self._events.flush()

    def write_eval(self, step, scalars):
        self.write_scalars(step, scalars)

    @_until_a_write_fails
    def write_histogram(self, step, name, values):
        from tensorboardX import summary

        self._write(step, summary.histogram(name, np.asarray(values, np.float64), bins="auto"))

    @_until_a_write_fails
    def write_hparams(self, config):
        from tensorboardX import summary

        for s in summary.hparams(flat_hparams(config), {}):
            self._write(0, s)
        self._write(0, summary.text("config", "```\n" + json.dumps(config, indent=2) + "\n```"))

    @_until_a_write_fails
    def flush(self):
        if self._events is None:
            return
        self._events.flush()
        if self._remote:  # an object is uploaded whole at each flush: start the next one empty
            self._events.close()
            self._events = None

    @_until_a_write_fails
    def close(self):
        if self._events is not None:
            self._events.close()
            self._events = None


class Writers(MetricWriter):
    """Fans every call out to the back-ends (none on processes other than the lead)."""

    def __init__(self, writers: list[MetricWriter]):
        self.writers = writers

    def write_scalars(self, step, scalars):
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_eval(self, step, scalars):
        for w in self.writers:
            w.write_eval(step, scalars)

    def write_histogram(self, step, name, values):
        for w in self.writers:
            w.write_histogram(step, name, values)

    def write_hparams(self, config):
        for w in self.writers:
            w.write_hparams(config)

    def flush(self):
        for w in self.writers:
            w.flush()

    def close(self):
        for w in self.writers:
            w.close()


def create(log_cfg, logdir: str, resume_step: int, lead: bool, config: dict) -> Writers:
    """The writers `log_cfg` asks for in `logdir` (none unless `lead`), with the config written once."""
    if not lead:
        return Writers([])
    writers: list[MetricWriter] = [JsonlWriter(logdir, resume_step)]
    if log_cfg.get("tensorboard", True):
        writers.append(TensorBoardWriter(logdir, resume_step))
    if log_cfg.get("wandb_project"):
        from jumprelu.train.wandb_writer import WandbWriter  # it subclasses MetricWriter, defined here

        writers.append(WandbWriter(logdir, log_cfg.wandb_project, config))
    out = Writers(writers)
    out.write_hparams(config)
    return out
