"""Orchestration only: data -> mesh -> state -> compiled step -> loop -> checkpoints -> report."""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import jax
import ml_collections

from jumprelu import config as config_lib
from jumprelu import data as data_lib
from jumprelu import fs
from jumprelu.core import kinds
from jumprelu.data import pipeline
from jumprelu.train import distributed, program, report, sharding, writers
from jumprelu.train import state as state_lib
from jumprelu.train.checkpoint import Checkpointer, member_dir
from jumprelu.train.metrics_log import Progress

log = logging.getLogger("jumprelu")

# Set by the preemption test: the process kills itself (SIGKILL) after this step.
_KILL_AT_STEP = int(os.environ.get("JUMPRELU_KILL_AT_STEP", "-1"))

_INIT_ROWS = 8192  # training rows a data-dependent start looks at

# Fields that fix the shapes and meaning of a checkpoint: a resumed run must match them.
_RESUME_FIELDS = (
    "sae.kind",
    "sae.width",
    "sae.threshold_param",
    "sae.pre_encoder_bias",
    "data.d_model",
    "stack.sparsity_coefficients",
)


def _get(d: dict, dotted: str):
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return json.loads(json.dumps(d))  # tuples and lists compare alike, as they are in the saved JSON


def _check_resumable(saved: dict, cfg: ml_collections.ConfigDict, directory: str) -> None:
    now = cfg.to_dict()
    for field in _RESUME_FIELDS:
        if _get(saved, field) != _get(now, field):
            raise config_lib.ConfigError(
                f"config field {field} is {_get(now, field)!r} but the checkpoint in {directory} "
                f"was trained with {_get(saved, field)!r}; use a new --workdir"
            )


def _initial_scale(cfg, store) -> float:
    if not cfg.data.normalize:
        return 1.0
    if cfg.data.scale is not None:
        return float(cfg.data.scale)
    return store.scale  # computed by the writer over every finite row


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) the SAE described by `cfg` in `workdir`; returns the report."""
    config_lib.validate(cfg)
    distributed.maybe_initialize(cfg.mesh)  # before anything touches a device
    store = data_lib.open_source(cfg.data, workdir)
    stream = data_lib.make_stream(cfg.data, store)
    cfg = ml_collections.ConfigDict(cfg.to_dict())  # an unlocked copy we may complete
    cfg.data.d_model = store.d_model
    mesh = sharding.make_mesh(cfg.mesh)
    prog = program.build(cfg, store.d_model, mesh, batch_dtype=store.dtype)
    log.info("compiled train step on mesh %s; memory: %s", dict(mesh.shape), prog.step.memory_analysis())

    fs.makedirs(workdir)
    ckpt = Checkpointer(workdir, keep=cfg.ckpt.keep, members=prog.members)
    if ckpt.latest_step() is not None:
        _check_resumable(ckpt.restore_config(), cfg, ckpt.directory)
        state = ckpt.restore_state(prog.abstract_state)  # onto this run's mesh, whatever it was saved from
        log.info("resumed from %s at step %d", ckpt.directory, int(state.step))
    else:
        scale = _initial_scale(cfg, store)
        key = jax.random.key(cfg.train.seed)
        state = state_lib.create_state(prog.model, prog.tx, mesh, key, scale, prog.kind.init_stats, prog.members)
        spec = kinds.spec(cfg.sae.kind)
        if spec.needs_data(cfg.sae):  # b_dec, θ or the bandwidth from the first training rows
            rows = stream.read(0, min(_INIT_ROWS, stream.num_train_rows))
            state = state_lib.start_from_data(state, spec, cfg.sae, rows, prog.members)
    if distributed.is_lead():
        fs.write_text_atomically(fs.join(workdir, "config.json"), json.dumps(cfg.to_dict(), indent=2))

    start = int(state.step)
    batches = _batches(cfg, prog, stream, ckpt, start)
    eval_rows = stream.eval_set() if writers.wants_histograms(cfg.log) else None
    state = _loop(cfg, workdir, prog, state, batches, ckpt, start, eval_rows)
    ckpt.close()
    return report.final_report(cfg, workdir, state, stream, start_step=start)


def _batches(cfg, prog, stream, ckpt, start):
    """The Grain iterator over this process's rows of each global batch, positioned at `start`."""
    part = distributed.process_rows(prog.batch_sharding, cfg.train.batch_size, stream.d_model)
    batches = pipeline.batch_iterator(
        stream,
        batch_size=cfg.train.batch_size,
        part=part,
        num_batches=cfg.train.steps,
        start=start,
        read_threads=cfg.data.read_threads,
        prefetch_batches=cfg.data.prefetch_batches,
    )
    if start and ckpt.restore_data(batches):
        if pipeline.next_index(batches) != start:
            raise RuntimeError(
                f"checkpoint {ckpt.directory}/{start}: the data pipeline was saved at batch "
                f"{pipeline.next_index(batches)} but the train state at step {start}"
            )
    # Without a saved state for this process count, `start` alone fixes the position:
    # global batch k does not depend on how many processes read it.
    return batches


def _loop(cfg, workdir, prog, state, batches, ckpt, start, eval_rows=None):
    total, every_log, every_ckpt = cfg.train.steps, cfg.log.every_steps, cfg.ckpt.every_steps
    batch_size = cfg.train.batch_size
    lead = distributed.is_lead()
    members = prog.members
    # One log per SAE (metrics.jsonl, events): WORKDIR, or WORKDIR/sae-i when stacked.
    log_dirs = [workdir] if not members else [member_dir(workdir, i) for i in range(members)]
    for d in log_dirs:
        fs.makedirs(d)
    progress = Progress(total, start, batch_size, enabled=cfg.log.progress and lead)
    config_json = cfg.to_dict()
    outs = [writers.create(cfg.log, d, start, lead, config_json) for d in log_dirs]
    t0 = time.perf_counter()
    for step in range(start, total):
        local = next(batches)
        batch = distributed.global_batch(local, prog.batch_sharding, batch_size)
        state, metrics = prog.step(state, batch)
        done = step + 1
        if done % every_log == 0 or done == total:
            # Metrics leave the device only here; the value is that of step `done`'s batch.
            host = jax.device_get(metrics)
            per_sae = [{k: float(v[i] if members else v) for k, v in host.items()} for i in range(max(members, 1))]
            rate = progress.update(done, per_sae[0])
            for out, values in zip(outs, per_sae, strict=True):
                out.write_scalars(done, {**values, "tokens_per_s": rate, "elapsed_s": time.perf_counter() - t0})
        if done % every_ckpt == 0 or done == total:
            ckpt.save(state, config_json, pipeline.IteratorSnapshot(batches))  # collective: every process takes part
            if eval_rows is not None and len(eval_rows):  # collective too
                writers.write_held_out(outs, done, writers.held_out(cfg, prog.kind, state, eval_rows))
            for out in outs:
                out.flush()
        if done == _KILL_AT_STEP:  # fault injection for the preemption test: die without any cleanup
            ckpt.wait()
            os.kill(os.getpid(), signal.SIGKILL)
    progress.close()
    for out in outs:
        out.close()
    ckpt.wait()
    return state
