"""Orchestration only: data -> mesh -> state -> jit(step) -> loop -> checkpoints -> report."""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from jumprelu import config as config_lib
from jumprelu import data as data_lib
from jumprelu import optim, report, sae, sharding
from jumprelu import state as state_lib
from jumprelu.checkpoint import Checkpointer
from jumprelu.metrics_log import MetricsLog, Progress, atomic_write_text
from jumprelu.step import make_train_step

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
    source = data_lib.open_source(cfg.data)
    cfg = ml_collections.ConfigDict(cfg.to_dict())  # an unlocked copy we may complete
    cfg.data.d_model = source.d_model
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_width(mesh, cfg.sae.width)
    sharding.check_batch(mesh, cfg.train.batch_size)

    model = sae.from_config(cfg.sae, source.d_model)
    tx = optim.make_optimizer(cfg.train)
    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer(workdir, keep=cfg.ckpt.keep)
    abstract = state_lib.with_shardings(mesh, state_lib.abstract_state(model, tx))
    if ckpt.latest_step() is not None:
        _check_resumable(ckpt.restore_config(), cfg, ckpt.directory)
        state = ckpt.restore_state(abstract)
        log.info("resumed from %s at step %d", ckpt.directory, int(state.step))
    else:
        scale = _initial_scale(cfg, source)
        state = state_lib.create_state(model, tx, mesh, jax.random.key(cfg.train.seed), scale)
    atomic_write_text(os.path.join(workdir, "config.json"), json.dumps(cfg.to_dict(), indent=2))

    batch_sharding = sharding.batch_sharding(mesh)
    step_fn = make_train_step(
        model, tx, optim.sparsity_schedule(cfg.train, cfg.sae.sparsity_coefficient), optim.learning_rate_schedule(cfg.train)
    )
    state_shardings = jax.tree.map(lambda a: a.sharding, abstract)
    batch_abstract = jax.ShapeDtypeStruct((cfg.train.batch_size, source.d_model), np.float32, sharding=batch_sharding)
    with jax.set_mesh(mesh):
        compiled = (
            jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                    out_shardings=(state_shardings, NamedSharding(mesh, sharding.REPLICATED)), donate_argnums=0)
            .lower(abstract, batch_abstract)
            .compile()
        )
    log.info("compiled train step; memory: %s", compiled.memory_analysis())

    start = int(state.step)
    state = _loop(cfg, workdir, compiled, state, source, batch_sharding, ckpt, start)
    ckpt.close()

    result = report.final_report(cfg, workdir, state, source, start_step=start)
    return result


def _loop(cfg, workdir, compiled, state, source, batch_sharding, ckpt, start):
    total, every_log, every_ckpt = cfg.train.steps, cfg.log.every_steps, cfg.ckpt.every_steps
    metrics_log = MetricsLog(workdir, resume_step=start)
    progress = Progress(total, start, cfg.train.batch_size, enabled=cfg.log.progress)
    config_json = cfg.to_dict()
    t0 = time.perf_counter()
    for step in range(start, total):
        batch = jax.device_put(source.batch(step, cfg.train.batch_size), batch_sharding)
        state, metrics = compiled(state, batch)
        done = step + 1
        if done % every_log == 0 or done == total:
            # Metrics leave the device only here; the value is that of step `done`'s batch.
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            rate = progress.update(done, host)
            metrics_log.write({"step": done, **host, "tokens_per_s": rate, "elapsed_s": time.perf_counter() - t0})
        if done % every_ckpt == 0 or done == total:
            ckpt.save(state, config_json)
    progress.close()
    metrics_log.close()
    ckpt.wait()
    return state
