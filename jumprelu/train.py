"""Orchestration only: data -> mesh -> state -> compiled step -> loop -> checkpoints -> report."""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import ml_collections

from jumprelu import config as config_lib
from jumprelu import data as data_lib
from jumprelu import distributed, program, report, sharding
from jumprelu import state as state_lib
from jumprelu.checkpoint import Checkpointer
from jumprelu.metrics_log import MetricsLog, Progress, atomic_write_text

log = logging.getLogger("jumprelu")

# Fields that fix the shapes and meaning of a checkpoint: a resumed run must match them.
_RESUME_FIELDS = ("sae.kind", "sae.width", "sae.threshold_param", "sae.pre_encoder_bias", "data.d_model")


def _get(d: dict, dotted: str):
    for k in dotted.split("."):
        d = d[k]
    return d


def _check_resumable(saved: dict, cfg: ml_collections.ConfigDict, directory: str) -> None:
    now = cfg.to_dict()
    for field in _RESUME_FIELDS:
        if _get(saved, field) != _get(now, field):
            raise config_lib.ConfigError(
                f"config field {field} is {_get(now, field)!r} but the checkpoint in {directory} "
                f"was trained with {_get(saved, field)!r}; use a new --workdir"
            )


def _initial_scale(cfg, source) -> float:
    if not cfg.data.normalize:
        return 1.0
    if cfg.data.scale is not None:
        return float(cfg.data.scale)
    return data_lib.estimate_scale(source.sample(cfg.data.scale_sample_rows))


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) the SAE described by `cfg` in `workdir`; returns the report."""
    config_lib.validate(cfg)
    distributed.maybe_initialize(cfg.mesh)  # before anything touches a device
    source = data_lib.open_source(cfg.data)
    cfg = ml_collections.ConfigDict(cfg.to_dict())  # an unlocked copy we may complete
    cfg.data.d_model = source.d_model
    mesh = sharding.make_mesh(cfg.mesh)
    prog = program.build(cfg, source.d_model, mesh)
    log.info("compiled train step on mesh %s; memory: %s", dict(mesh.shape), prog.step.memory_analysis())

    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer(workdir, keep=cfg.ckpt.keep)
    if ckpt.latest_step() is not None:
        _check_resumable(ckpt.restore_config(), cfg, ckpt.directory)
        state = ckpt.restore_state(prog.abstract_state)  # onto this run's mesh, whatever it was saved from
        log.info("resumed from %s at step %d", ckpt.directory, int(state.step))
    else:
        scale = _initial_scale(cfg, source)
        state = state_lib.create_state(prog.model, prog.tx, mesh, jax.random.key(cfg.train.seed), scale)
    if distributed.is_lead():
        atomic_write_text(os.path.join(workdir, "config.json"), json.dumps(cfg.to_dict(), indent=2))

    start = int(state.step)
    state = _loop(cfg, workdir, prog, state, source, ckpt, start)
    ckpt.close()
    return report.final_report(cfg, workdir, state, source, start_step=start)


def _loop(cfg, workdir, prog, state, source, ckpt, start):
    total, every_log, every_ckpt = cfg.train.steps, cfg.log.every_steps, cfg.ckpt.every_steps
    batch_size = cfg.train.batch_size
    lead = distributed.is_lead()
    metrics_log = MetricsLog(workdir, resume_step=start) if lead else None
    progress = Progress(total, start, batch_size, enabled=cfg.log.progress and lead)
    my_rows = distributed.process_rows(prog.batch_sharding, batch_size, source.d_model)
    config_json = cfg.to_dict()
    t0 = time.perf_counter()
    for step in range(start, total):
        local = source.batch(step, batch_size, my_rows)
        batch = distributed.global_batch(local, prog.batch_sharding, batch_size)
        state, metrics = prog.step(state, batch)
        done = step + 1
        if done % every_log == 0 or done == total:
            # Metrics leave the device only here; the value is that of step `done`'s batch.
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            rate = progress.update(done, host)
            if lead:
                metrics_log.write({"step": done, **host, "tokens_per_s": rate, "elapsed_s": time.perf_counter() - t0})
        if done % every_ckpt == 0 or done == total:
            ckpt.save(state, config_json)  # collective: every process takes part
    progress.close()
    if metrics_log:
        metrics_log.close()
    ckpt.wait()
    return state
