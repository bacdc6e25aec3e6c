"""Orchestration only: lock -> data -> mesh -> compiled step -> resume -> loop -> checkpoints -> report.

Everything a user can get wrong (config, workdir, store, resume mismatch) fails as one line
before the step is compiled. During the loop, `guard` stops a diverging run before it saves
anything non-finite and `preemption` turns SIGTERM/SIGINT into a saved step; see README,
"What survives what".
"""

from __future__ import annotations

import contextlib
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
from jumprelu.core import init as init_lib
from jumprelu.core import kinds
from jumprelu.data import pipeline
from jumprelu.errors import ConfigError
from jumprelu.evaluate.metrics import MIN_ROWS
from jumprelu.train import (
    distributed,
    guard,
    held_out,
    lock,
    metrics_log,
    preemption,
    program,
    report,
    resume,
    sharding,
    writers,
)
from jumprelu.train import state as state_lib
from jumprelu.train import workdir as workdir_lib
from jumprelu.train.checkpoint import Checkpointer, member_dir
from jumprelu.train.metrics_log import Progress

log = logging.getLogger("jumprelu")

# Set by the preemption tests: the process sends itself this signal (default SIGKILL) after this step.
_KILL_AT_STEP = int(os.environ.get("JUMPRELU_KILL_AT_STEP", "-1"))
_KILL_SIGNAL = getattr(signal, os.environ.get("JUMPRELU_KILL_SIGNAL", "SIGKILL"))
_INIT_ROWS = 8192  # training rows a data-dependent start looks at


def _initial_scale(cfg, stream) -> float:
    if not cfg.data.normalize:
        return 1.0
    if cfg.data.scale is not None:
        return float(cfg.data.scale)
    return stream.scale  # a store's: computed by the writer over every finite row


def train(cfg: ml_collections.ConfigDict, workdir: str, open_rows=None) -> dict:
    """Trains (or resumes) the SAE described by `cfg` in `workdir`; returns the report.

    open_rows: for `data.source = "lm"`, a function (data config, workdir) -> the rows
    (`data.TrainingRows` with a `batch_iterator`); `jumprelu.harvest.onthefly` gives it,
    since the language model lives above this package.

    Raises `errors.Diverged` if the loss or state stops being finite, and
    `preemption.Preempted` after saving the current step on SIGTERM/SIGINT.
    """
    config_lib.validate(cfg)
    if cfg.data.source == data_lib.LM_SOURCE and open_rows is None:
        raise ConfigError(
            f"config field data.source is {data_lib.LM_SOURCE!r} (rows from the language model): run it with "
            "`jumprelu train`, or call jumprelu.harvest.onthefly.train(cfg, workdir)"
        )
    distributed.maybe_initialize(cfg.mesh)  # before anything touches a device
    # a second run on this workdir, an unusable workdir or another program's folder fails here
    with lock.hold(workdir, check=workdir_lib.refuse_foreign_workdir):
        return _train(cfg, workdir, open_rows)


def _open_rows(cfg, workdir, open_rows):
    if cfg.data.source == data_lib.LM_SOURCE:
        return open_rows(cfg.data, workdir)
    return data_lib.make_stream(cfg.data, data_lib.open_source(cfg.data, workdir))


def _train(cfg: ml_collections.ConfigDict, workdir: str, open_rows=None) -> dict:
    stream = _open_rows(cfg, workdir, open_rows)
    try:  # every SAE program of the run is traced at sae.matmul_precision (the LM's are not)
        with kinds.matmul_precision(cfg.sae):
            return _train_on(cfg, workdir, stream)
    finally:
        stream.close()


def _train_on(cfg: ml_collections.ConfigDict, workdir: str, stream) -> dict:
    cfg = ml_collections.ConfigDict(cfg.to_dict())  # an unlocked copy we may complete
    cfg.data.d_model = stream.d_model
    cfg.trained_on = data_lib.trained_on(cfg.data, stream)  # saved with the config: exports name the hook
    # (a store's count is known at open; the LM's would cost a pass over the texts)
    train_rows = stream.num_train_rows if isinstance(stream, data_lib.BatchStream) else None
    if train_rows is not None and train_rows < cfg.train.batch_size:
        log.warning(
            "the store holds %d training rows (after data.eval_rows=%d held out), fewer than one batch of %d: "
            "every batch repeats rows",
            train_rows,
            cfg.data.eval_rows,
            cfg.train.batch_size,
        )
    held = config_lib.controller_rows(cfg)
    if cfg.data.eval_rows and cfg.data.eval_rows - held < MIN_ROWS:  # said at the start, not found at the end
        log.warning(
            "the L0 controller reads %d of the data.eval_rows=%d held-out rows, which leaves the report none: "
            "no held-out metrics at the end, nor from `jumprelu evaluate` or `refit` (raise data.eval_rows)",
            held,
            cfg.data.eval_rows,
        )
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_width(mesh, cfg.sae.width)  # (program.build checks these too, but after the checkpoints exist)
    sharding.check_batch(mesh, cfg.train.batch_size)
    ckpt = Checkpointer(workdir, keep=cfg.ckpt.keep, members=len(cfg.stack.sparsity_coefficients))
    closing = False
    try:
        resume.check_latest_config(ckpt, cfg)  # a mismatch fails before compiling
        prog = program.build(cfg, stream.d_model, mesh, batch_dtype=stream.dtype)
        log.info("compiled train step on mesh %s; memory: %s", dict(mesh.shape), prog.step.memory_analysis())
        log.info("train step: %s", prog.step_path)
        if cfg.sae.kind == "jumprelu" and cfg.sae.get("target_l0") is None:  # set (a recipe's), so say so
            idle = [f"sae.{k}" for k in config_lib.CONTROLLER_PARTS if cfg.sae.get(k)]
            if idle:
                log.info("%s: inactive without sae.target_l0 (parts of the target-L0 controller)", ", ".join(idle))
        state = resume.restore_intact(ckpt, cfg, prog.abstract_state)  # onto this mesh, whatever it was saved from
        if state is not None:
            log.info("resumed from %s at step %d", ckpt.directory, int(state.step))
        else:
            scale = _initial_scale(cfg, stream)
            key = jax.random.key(cfg.train.seed)
            state = state_lib.create_state(prog.model, prog.tx, mesh, key, scale, prog.kind.init_stats, prog.members)
            spec = kinds.spec(cfg.sae.kind)
            if spec.needs_data(cfg.sae):  # b_dec, θ or the bandwidth from the first training rows
                rows = stream.read(0, min(_INIT_ROWS, stream.num_train_rows))
                # the target-L0 controller's rows come from the store's held-out split (data.eval_rows)
                held = stream.eval_set() if config_lib.controller_rows(cfg) else None
                state = state_lib.start_from_data(state, spec, cfg.sae, rows, prog.members, held_out=held)
        if cfg.data.source == data_lib.LM_SOURCE and cfg.data.normalize:
            # C was estimated from the first rows (no store holds it): the config records it too.
            cfg.data.scale = float(jax.device_get(state.scale))
        if distributed.is_lead():
            fs.write_text_atomically(fs.join(workdir, "config.json"), json.dumps(cfg.to_dict(), indent=2))
        start = int(state.step)
        batches = _batches(cfg, prog, stream, ckpt, start)
        eval_rows = None
        if held_out.wants_histograms(cfg.log):  # without the rows the target-L0 controller reads
            eval_rows = init_lib.report_rows(stream.eval_set(), config_lib.controller_rows(cfg))
        # One watch from the first step to the written report: after the last step's save a SIGTERM/
        # Ctrl-C is noted and the report (seconds) still written, instead of the process ending
        # without it and with its lock left behind (between two watches it did; one the loop noted
        # after its last step was not reported)
        with preemption.Watch() as watch:
            state = _loop(cfg, workdir, prog, state, batches, ckpt, start, watch, eval_rows)
            closing = True  # (a close that fails is not tried again below)
            ckpt.close()
            result = report.final_report(cfg, workdir, state, stream, start_step=start)
    except BaseException:
        if not closing:
            with contextlib.suppress(Exception):  # the error under way is the one to report
                ckpt.close()
        raise
    if watch.signal_name:
        finished = "the run had finished, so the report was written first"
        log.warning("%s during the final report: %s", watch.signal_name, finished)
    return result


def _batches(cfg, prog, stream, ckpt, start):
    """The Grain iterator over this process's rows of each global batch, positioned at `start`."""
    part = distributed.process_rows(prog.batch_sharding, cfg.train.batch_size, stream.d_model)
    if isinstance(stream, data_lib.BatchStream):
        batches = pipeline.batch_iterator(
            stream,
            batch_size=cfg.train.batch_size,
            part=part,
            num_batches=cfg.train.steps,
            start=start,
            read_threads=cfg.data.read_threads,
            prefetch_batches=cfg.data.prefetch_batches,
        )
    else:  # rows from another source (data.TrainingRows), e.g. the on-the-fly LM's shuffle buffer
        batches = stream.batch_iterator(
            batch_size=cfg.train.batch_size, part=part, num_batches=cfg.train.steps, start=start
        )
    if start and ckpt.restore_data(batches, start):
        if pipeline.next_index(batches) != start:
            raise RuntimeError(
                f"checkpoint {ckpt.directory}/{start}: the data pipeline was saved at batch "
                f"{pipeline.next_index(batches)} but the train state at step {start}"
            )
    # Without a saved state for this process count, `start` alone fixes the position:
    # global batch k does not depend on how many processes read it.
    return batches


def _last_good(ckpt):
    def last_good():
        ckpt.wait()  # every save is of a checked state: once complete, the newest is good
        step = ckpt.latest_step()
        return None if step is None else ckpt.step_dir(step)

    return last_good


def _loop(cfg, workdir, prog, state, batches, ckpt, start, watch, eval_rows=None):
    total, every_log, every_ckpt = cfg.train.steps, cfg.log.every_steps, cfg.ckpt.every_steps
    batch_size = cfg.train.batch_size
    skip_batches = bool(cfg.train.skip_nonfinite_batches)
    lead = distributed.is_lead()
    members = prog.members
    # One log per SAE (metrics.jsonl, events): WORKDIR, or WORKDIR/sae-i when stacked.
    log_dirs = [workdir] if not members else [member_dir(workdir, i) for i in range(members)]
    for d in log_dirs:
        fs.makedirs(d)
    for i in range(members if lead else 0):  # each member's folder loads from the first checkpoint on
        report.write_member_files(cfg, workdir, i)
    progress = Progress(total, start, batch_size, enabled=cfg.log.progress and lead)
    config_json = cfg.to_dict()
    # The lowest FVU logged before a resume: records up to `start` (the writers cut the logs back there).
    history = [metrics_log.read_metrics(fs.join(d, "metrics.jsonl")) if lead else [] for d in log_dirs]
    blow_up = guard.BlowUp(cfg.train.get("divergence_fvu", 0.0), history, start)
    blow_up.share()  # process 0's reading on every process, so all of them stop together
    outs = [writers.create(cfg.log, d, start, lead, config_json) for d in log_dirs]
    skips = guard.SkipWatch(skip_batches, start, members)
    checked = start  # the last step the guard found finite
    sparse_share = metrics_log.IntervalMean("sparse_step")
    t0 = time.perf_counter()
    try:
        for step in range(start, total):
            local = next(batches)
            batch = distributed.global_batch(local, prog.batch_sharding, batch_size)
            state, metrics = prog.step(state, batch)
            sparse_share.add(metrics)
            done = step + 1
            log_step = done % every_log == 0 or done == total
            save_step = done % every_ckpt == 0 or done == total
            stop = watch.requested(done, sync_step=log_step or save_step)
            if log_step or save_step or stop:
                # Metrics leave the device only here; the value is that of step `done`'s batch
                # (sparse_step's at a log: its share over the steps since the previous log).
                host = jax.device_get(metrics)
                if log_step:
                    host = sparse_share.pop_into(host)
                n = max(members, 1)
                per_sae = [{k: float(v[i] if members else v) for k, v in host.items()} for i in range(n)]
                guard.check(state, per_sae, done, checked, skip_batches, _last_good(ckpt), blow_up)
                skips.check(per_sae, done - checked, done, _last_good(ckpt))
                checked = done
                if log_step:  # only logged FVUs count, as a resumed run reads them back
                    blow_up.record(per_sae)
            if log_step:
                rate = progress.update(done, per_sae[0])
                for out, values in zip(outs, per_sae, strict=True):
                    out.write_scalars(done, {**values, "tokens_per_s": rate, "elapsed_s": time.perf_counter() - t0})
            if save_step or stop:  # a preemption save is of the step reached, checked above
                ckpt.save(state, config_json, pipeline.IteratorSnapshot(batches))  # collective: every process
                if save_step and eval_rows is not None and len(eval_rows) >= MIN_ROWS:  # collective too
                    held_out.write(outs, done, held_out.metrics(cfg, prog.kind, state, eval_rows))
                for out in outs:
                    out.flush()
            if stop and done < total:
                ckpt.wait()
                raise preemption.Preempted(watch.signal_name, done, ckpt.step_dir(done))
            if done == _KILL_AT_STEP:  # fault injection for the preemption tests
                if _KILL_SIGNAL == signal.SIGKILL:  # die without any cleanup, the last save complete
                    ckpt.wait()
                os.kill(os.getpid(), _KILL_SIGNAL)
    finally:
        progress.close()
        for out in outs:
            out.close()
    ckpt.wait()
    return state
