"""The wandb back-end of the metric writers (`writers.py`): one wandb run per SAE, whose id is a
hash of the workdir, so a resumed run continues it. wandb is imported only when a run names
`log.wandb_project`."""

from __future__ import annotations

import contextlib
import hashlib
import logging

import numpy as np

from jumprelu import fs
from jumprelu.train.writers import MetricWriter

log = logging.getLogger("jumprelu")


class WandbWriter(MetricWriter):
    """A wandb run per SAE; its id is a hash of the workdir, so a resumed run continues it."""

    def __init__(self, logdir: str, project: str, config: dict, name: str | None = None):
        try:
            import wandb
        except ImportError:
            from jumprelu.errors import ConfigError

            raise ConfigError(
                f"config field log.wandb_project is {project!r} but wandb is not installed: "
                "pip install 'jumprelu[wandb]' (or unset it)"
            ) from None
        self._wandb = wandb
        self._failed = False
        run_id = hashlib.sha1(fs.abspath(logdir).encode()).hexdigest()[:16]
        kwargs = {} if fs.is_remote(logdir) else {"dir": logdir}
        try:
            self._run = wandb.init(
                project=project, id=run_id, resume="allow", name=name or fs.abspath(logdir), config=config, **kwargs
            )
        except Exception as e:  # no API key, no network, a project it may not write to: wandb's many errors
            from jumprelu.errors import ConfigError

            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(
                f"config field log.wandb_project is {project!r} but wandb could not start a run: {first}; "
                "run `wandb login` (or set WANDB_MODE=offline), or unset it"
            ) from None

    def _log(self, record: dict, step: int) -> None:
        """A wandb call that fails mid-run (the network, the service) ends wandb logging with one
        warning; training, metrics.jsonl and the checkpoints go on."""
        if self._failed:
            return
        try:
            self._run.log(record, step=step)
        except Exception as e:
            self._failed = True
            log.warning(
                "wandb: cannot log step %d (%s); no more wandb logging this run (metrics.jsonl goes on)", step, e
            )

    def write_scalars(self, step, scalars):
        self._log(dict(scalars), step)

    def write_histogram(self, step, name, values):
        self._log({name: self._wandb.Histogram(np.asarray(values))}, step)

    def close(self):
        with contextlib.suppress(Exception):  # the run's files are uploaded by wandb's own process
            self._run.finish()
