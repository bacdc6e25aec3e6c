"""Issue 15: never lose a good SAE. Divergence, a locked workdir, torn metrics, damaged checkpoints,
full disks and signals, each the reproduction of a failure that once lost work or printed a traceback."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import types

import numpy as np
import orbax.checkpoint as ocp
import pytest

import jumprelu
from jumprelu.errors import EXIT_DIVERGED, CheckpointError, ConfigError, Diverged, WorkdirError
from jumprelu.store import StoreWriter
from jumprelu.train import lock as lock_lib
from jumprelu.train import metrics_log
from jumprelu.train.checkpoint import Checkpointer
from jumprelu.train.loop import train
from jumprelu.train.preemption import Watch
from tests.test_train import ROOT, TINY_FLAGS, read_jsonl, run_main


def _steps(wd):
    return Checkpointer(str(wd), keep=1, read_only=True).steps()


def _assert_finite(wd):
    for k, v in jumprelu.load(str(wd)).params().items():
        assert np.isfinite(v).all(), k


def test_divergence_after_good_checkpoints_keeps_them(tmp_path, tiny_config):
    """Item 1: 40 good steps, then lr=1e30: the run stops at the first log step with the loss NaN,
    naming it and the last good checkpoint; nothing is saved, rotation deletes nothing."""
    wd = tmp_path / "run"
    tiny_config.ckpt.keep = 2
    train(tiny_config, str(wd))
    assert _steps(wd) == [40, 20]
    tiny_config.train.update(steps=100, lr=1e30)
    with pytest.raises(Diverged) as e:
        train(tiny_config, str(wd))
    assert str(e.value).startswith(
        f"training diverged by step 45 (finite at step 40): loss is nan; nothing non-finite was saved and the last "
        f"good checkpoint is {wd / 'checkpoints' / '40'};"
    )
    assert e.value.exit_status == EXIT_DIVERGED and "\n" not in str(e.value)
    assert _steps(wd) == [40, 20]
    _assert_finite(wd)
    assert [r["step"] for r in read_jsonl(wd / "metrics.jsonl")] == list(range(5, 41, 5))


def test_a_finite_blow_up_stops_the_run_too(tmp_path, tiny_config):
    """A run resumed at lr 3 stays finite but its reconstruction blows up (batch FVU ~1e10): the guard
    stops it at the first log step, from the FVU the interrupted run had logged; nothing is saved.
    With train.divergence_fvu=0 the same run trains on, and saves the blown-up state; resuming from
    that checkpoint with the check on says the checkpoint itself must go."""
    wd = tmp_path / "run"
    train(tiny_config, str(wd))
    tiny_config.train.update(steps=50, lr=3.0)
    with pytest.raises(Diverged) as e:
        train(tiny_config, str(wd))
    message = str(e.value)
    assert message.startswith("training diverged by step 45 (checked at step 40): batch FVU ")
    assert "(train.divergence_fvu=2; L0 " in message and "\n" not in message
    assert f"the last good checkpoint is {wd / 'checkpoints' / '40'};" in message
    # the first check after a resume: the checkpoint's own last update is one no FVU had seen
    assert message.endswith(f"if it diverges again at its first log step, {wd / 'checkpoints' / '40'} may hold the "
                            "update that blew up: move it aside")  # fmt: skip
    assert _steps(wd) == [40, 20] and e.value.exit_status == EXIT_DIVERGED
    _assert_finite(wd)

    tiny_config.train.divergence_fvu = 0.0
    assert train(tiny_config, str(wd))["steps"] == 50
    assert read_jsonl(wd / "metrics.jsonl")[-1]["fvu"] > 1e3  # finite, and no longer an SAE's
    tiny_config.train.update(divergence_fvu=2.0, steps=60)
    with pytest.raises(Diverged) as e:
        train(tiny_config, str(wd))
    assert str(e.value).startswith("training diverged by step 55: batch FVU ")
    assert f"which this run resumed from; that checkpoint ({wd / 'checkpoints' / '50'}) was saved past" in str(e.value)


def test_blow_up_rule():
    """Counts only after the run has been below a quarter of the limit; names the stacked member;
    history past the resumed step is ignored; only recorded (logged) FVUs count."""
    from jumprelu.train.guard import BlowUp

    fresh = BlowUp(2.0, [[], []], start=0)
    assert fresh.problem([{"fvu": 3.0}, {"fvu": 2.5}]) is None  # an untrained SAE
    fresh.record([{"fvu": 0.6}, {"fvu": 0.4}])
    assert fresh.problem([{"fvu": 2.5}, {"fvu": 1.9}]) is None  # member 0 never went below 0.5
    assert fresh.problem([{"fvu": 0.3}, {"fvu": 2.2, "l0": 700.0}]) == (
        "batch FVU 2.2 after reaching 0.4 (stacked SAE 1) (train.divergence_fvu=2; L0 700)",
        False,
    )
    assert fresh.problem([{"fvu": 0.3}, {"fvu": 1.05, "l0": 0.0}]) is None  # collapsed (all latents dead): not this
    unlogged = BlowUp(2.0, [[]], start=0)
    unlogged.problem([{"fvu": 0.1}])  # a check at a save step only: not recorded
    assert unlogged.problem([{"fvu": 2.5}]) is None
    resumed = BlowUp(2.0, [[{"step": 10, "fvu": 0.9}, {"step": 30, "fvu": 0.2}]], start=20)
    assert resumed.problem([{"fvu": 2.5}]) is None  # 0.2 was logged after step 20, by a run that was cut short
    assert BlowUp(2.0, [[{"step": 10, "fvu": 0.4}]], start=10).problem([{"fvu": 2.5}]) == (
        "batch FVU 2.5 after reaching 0.4 (train.divergence_fvu=2)",
        False,
    )
    assert BlowUp(0.0, [[{"step": 10, "fvu": 0.1}]], start=10).problem([{"fvu": 1e9}]) is None  # off


def _store_with_unrecorded_nan_rows(path):
    """A store without checksums (format 1) whose shard gained NaN rows its metadata does not know about."""
    rows = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32)
    w = StoreWriter(str(path), d_model=16, shuffle_seed=None)
    w.append(rows)
    w.close()
    meta = json.loads((path / "metadata.json").read_text())
    meta["format_version"] = 1
    del meta["checksum"], meta["shards"][0]["crc32"]
    (path / "metadata.json").write_text(json.dumps(meta))
    shard = np.load(path / "shard-00000.npy", mmap_mode="r+")
    shard[[100, 1500, 2900], 3] = np.nan
    shard.flush()


def test_nan_rows_the_metadata_does_not_know_stop_or_are_skipped(tmp_path, tiny_config):
    """Item 1: NaN rows that slip past the store's checks; train.skip_nonfinite_batches continues instead."""
    _store_with_unrecorded_nan_rows(tmp_path / "s")
    tiny_config.data.update(source=str(tmp_path / "s"), eval_rows=256)
    tiny_config.train.steps = 30
    with pytest.raises(Diverged, match="loss is nan"):
        train(tiny_config, str(tmp_path / "stop"))
    tiny_config.train.skip_nonfinite_batches = True
    report = train(tiny_config, str(tmp_path / "skip"))
    assert report["steps"] == 30
    skipped = [r["skipped_batches"] for r in read_jsonl(tmp_path / "skip" / "metrics.jsonl")]
    assert skipped == sorted(skipped) and 1 <= skipped[-1] <= 6  # counted, cumulative; a NaN row spoils a batch
    assert report["skipped_batches"] == skipped[-1]
    _assert_finite(tmp_path / "skip")


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_run_that_skips_every_batch_says_so_and_stops(tmp_path, tiny_config):
    """Found by an audit: with train.skip_nonfinite_batches a run whose every batch was dropped
    reported success (exit 0, no word of the skips), and metrics.jsonl held NaN and Infinity,
    which strict JSON readers (jq, JavaScript) refuse."""
    from jumprelu.train import guard
    from jumprelu.train.report import format_report

    tiny_config.data.scale = 1e-25  # every batch overflows
    tiny_config.train.update(skip_nonfinite_batches=True, steps=20)
    tiny_config.log.every_steps = 10
    report = train(tiny_config, str(tmp_path / "short"))
    assert report["skipped_batches"] == 20
    assert "WARNING: 20 of 20 batches were skipped as non-finite" in format_report(report)
    assert _strict_json((tmp_path / "short" / "report.json").read_text())["skipped_batches"] == 20
    records = [_strict_json(line) for line in (tmp_path / "short" / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["loss"] is None for r in records)  # not finite: null
    tiny_config.train.steps = guard.ALL_SKIPPED_STEPS + 20
    with pytest.raises(Diverged, match=f"step {guard.ALL_SKIPPED_STEPS}: every batch of the last "
                       f"{guard.ALL_SKIPPED_STEPS} steps was skipped as non-finite"):  # fmt: skip
        train(tiny_config, str(tmp_path / "long"))


def test_a_skipped_batch_keeps_the_state_but_not_the_clocks(tiny_config):
    """The lr schedule counts its own steps: a skipped batch used to hold that count back, so
    warm-up and decay ran late and the logged lr was not the applied one."""
    import jax
    import jax.numpy as jnp

    from jumprelu.train import optim, program, sharding
    from jumprelu.train import state as state_lib

    tiny_config.train.update(skip_nonfinite_batches=True, lr_decay_fraction=0.5, steps=10, lr_warmup_steps=0)
    tiny_config.sae.update(target_l0=5.0, batchtopk_fraction=0.5, threshold_param="raw")
    d = tiny_config.data.d_model = 32
    prog = program.build(tiny_config, d, sharding.make_mesh(tiny_config.mesh))
    state = state_lib.create_state(prog.model, prog.tx, sharding.make_mesh(tiny_config.mesh), jax.random.key(0), 1.0,
                                   prog.kind.init_stats)  # fmt: skip
    good = np.random.default_rng(0).normal(size=(tiny_config.train.batch_size, d)).astype(np.float32)
    bad = good.copy()
    bad[0, 0] = np.nan
    for batch in [bad, bad, good, good]:
        before = jax.tree.map(np.asarray, state.params)
        state, metrics = prog.step(state, jnp.asarray(batch))
    assert int(state.step) == 4 and int(state.skipped) == 2
    counts = {int(x) for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.integer)}
    assert counts == {4} and int(state.stats["steps_seen"]) == 4  # every clock at the step
    lr = optim.learning_rate_schedule(tiny_config.train)
    assert float(metrics["lr"]) == pytest.approx(float(lr(3)))  # the logged lr is the applied one
    applied = np.asarray(state.params["b_dec"]) - before["b_dec"]
    assert np.any(applied != 0)  # the good batch did update


def test_divergence_from_the_start_saves_nothing(tmp_path, tiny_config):
    """Item 1: data.scale=1e-20 overflows the first step; no checkpoint is ever written."""
    tiny_config.data.scale = 1e-20
    with pytest.raises(Diverged, match="diverged by step 5 .*; nothing non-finite was saved and no checkpoint"):
        train(tiny_config, str(tmp_path / "run"))
    assert _steps(tmp_path / "run") == []


def test_a_second_run_on_a_locked_workdir_is_refused(tmp_path, tiny_config, caplog, monkeypatch):
    """Item 4: the second run fails at once (before the store is written), naming the holder."""
    wd = tmp_path / "run"
    holder = lock_lib.WorkdirLock(str(wd))
    holder.acquire()
    with pytest.raises(WorkdirError) as e:
        train(tiny_config, str(wd))
    assert str(e.value).startswith(
        f"workdir {wd} is in use by another run: pid {os.getpid()} on host {socket.gethostname()} (since "
    )
    assert not (wd / "synthetic_store").exists()
    holder.release()
    assert not (wd / "lock.json").exists()

    # A holder that died without releasing: the kernel dropped its flock, its name is still in the file.
    dead = (
        "import fcntl, os, json, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, json.dumps({'pid': os.getpid(), 'host': 'h'}).encode()); "
        "os.kill(os.getpid(), 9)"
    )
    subprocess.run([sys.executable, "-c", dead, str(wd / "lock.json")], timeout=60)
    with caplog.at_level("WARNING", logger="jumprelu"):
        taker = lock_lib.WorkdirLock(str(wd))
        taker.acquire()
    assert "taking over the lock left by pid" in caplog.text and "on host h" in caplog.text
    assert json.loads((wd / "lock.json").read_text())["pid"] == os.getpid()
    taker.release()

    # The object-store variant (gs:// workdirs), exercised on a local path.
    monkeypatch.setattr(lock_lib, "SETTLE_S", 0.0)
    first = lock_lib.WorkdirLock(str(wd))
    first.acquire(object_lock=True)
    with pytest.raises(WorkdirError, match="is in use by another run: pid"):
        lock_lib.WorkdirLock(str(wd)).acquire(object_lock=True)
    stale = dict(json.loads((wd / "lock.json").read_text()), heartbeat=0.0)
    first._stop.set()  # its heartbeat stops, as if its process had died
    first._beat.join()
    (wd / "lock.json").write_text(json.dumps(stale))
    second = lock_lib.WorkdirLock(str(wd))
    second.acquire(object_lock=True)  # stale: taken over
    second.release()
    assert not (wd / "lock.json").exists()


def test_unusable_workdir_is_one_line_before_any_work(tmp_path, tiny_config, monkeypatch):
    """Item 7: a workdir that is a file, or on a read-only file system."""
    (tmp_path / "file").write_text("")
    with pytest.raises(WorkdirError, match=f"^workdir {tmp_path / 'file'} is not a directory"):
        train(tiny_config, str(tmp_path / "file"))
    real_open = os.open

    def read_only(path, flags, *a):
        if str(path).endswith("lock.json"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_open(path, flags, *a)

    monkeypatch.setattr(lock_lib.os, "open", read_only)
    with pytest.raises(WorkdirError, match=f"^workdir {tmp_path / 'ro'} is not writable: Read-only file system$"):
        train(tiny_config, str(tmp_path / "ro"))
    assert not (tmp_path / "ro" / "synthetic_store").exists()


def test_a_folder_of_other_files_is_refused_as_a_workdir(tmp_path, tiny_config):
    """An audit: a model's config.json and a project's report.json were replaced by the run's without
    a word. A run's own folder (a config.json of a run's, a lock left by a killed run) is still
    trained in, and so is a folder whose files the run does not write (a store, notes)."""
    other = tmp_path / "model"
    other.mkdir()
    (other / "config.json").write_text('{"architectures": ["Gemma2ForCausalLM"]}')
    (other / "report.json").write_text("notes")
    (other / "notes.txt").write_text("")
    with pytest.raises(WorkdirError, match=f"^workdir {other} holds config.json, report.json, which no jumprelu"):
        train(tiny_config, str(other))
    assert (other / "config.json").read_text() == '{"architectures": ["Gemma2ForCausalLM"]}'
    assert sorted(p.name for p in other.iterdir()) == ["config.json", "notes.txt", "report.json"]
    tiny_config.train.steps = 5
    for i, marker in enumerate(("lock.json", "notes.txt")):  # a killed run's lock; a file runs do not write
        (tmp_path / f"run{i}").mkdir()
        (tmp_path / f"run{i}" / marker).write_text("")
        train(tiny_config, str(tmp_path / f"run{i}"))
        assert (tmp_path / f"run{i}" / "report.json").exists()
    (tmp_path / "run0" / "checkpoints").rename(tmp_path / "moved")  # config.json and metrics: a run's
    tiny_config.train.steps = 10
    assert train(tiny_config, str(tmp_path / "run0"))["steps"] == 10


def test_a_store_or_a_runs_checkpoints_folder_is_refused_as_a_workdir(tmp_path, tiny_config):
    """Found by an audit: `--workdir` given an activation store (swapped with data.source) or
    another run's checkpoints/ trained a whole run there, its files among the shards or its
    checkpoints beside the other run's steps."""
    store = tmp_path / "acts"
    w = StoreWriter(str(store), d_model=32)
    w.append(np.random.default_rng(0).normal(size=(4096, 32)).astype(np.float32))
    w.close()
    before = sorted(p.name for p in store.iterdir())
    tiny_config.train.steps = 5
    with pytest.raises(WorkdirError, match=f"^workdir {store} is an activation store .*data.source\\)$"):
        train(tiny_config, str(store))
    assert sorted(p.name for p in store.iterdir()) == before
    half = tmp_path / "half"  # a write under way: shards and writing.json, no metadata.json yet
    w = StoreWriter(str(half), d_model=32, shard_rows=1024)
    w.append(np.random.default_rng(1).normal(size=(2048, 32)).astype(np.float32))
    with pytest.raises(WorkdirError, match="is an activation store"):
        train(tiny_config, str(half))
    run = tmp_path / "run"
    train(tiny_config, str(run))
    for inside in (run / "checkpoints", run / "checkpoints" / "5", run / "checkpoints" / "new"):
        with pytest.raises(WorkdirError, match=f"^workdir {inside} is inside the checkpoints of run {run}; resume"):
            train(tiny_config, str(inside))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["5"]
    tiny_config.data.source = str(store)  # a store as a subfolder of the workdir stays allowed
    train(tiny_config, str(tmp_path))
    assert (tmp_path / "report.json").exists()


def test_a_finished_run_given_other_settings_is_refused_and_a_resumed_one_names_them(tmp_path, tiny_config, caplog):
    """Found by an audit: rerunning `train` into a finished workdir with another λ or lr trained
    nothing, printed the old SAE's results as the new settings' and rewrote config.json to claim them."""
    wd = tmp_path / "run"
    tiny_config.train.steps = 5
    train(tiny_config, str(wd))
    config_before = (wd / "config.json").read_text()
    assert train(tiny_config, str(wd))["steps"] == 5  # the same settings: a no-op rerun, as before
    tiny_config.sae.sparsity_coefficient *= 10
    with pytest.raises(
        ConfigError, match=r"checkpoints/5 is this run's last step \(train.steps=5\), trained with other "
    ):
        train(tiny_config, str(wd))
    assert (wd / "config.json").read_text() == config_before
    tiny_config.train.steps = 10  # training on with them: said, then done
    with caplog.at_level("WARNING", logger="jumprelu"):
        assert train(tiny_config, str(wd))["steps"] == 10
    assert "with changed settings, applied from this step on: sae.sparsity_coefficient" in caplog.text


def test_torn_metrics_line_resumes(tmp_path, tiny_config, caplog):
    """Item 5: half a JSON line at the end of metrics.jsonl (a full disk) no longer blocks the resume."""
    wd = tmp_path / "run"
    tiny_config.train.steps = 20
    train(tiny_config, str(wd))
    with open(wd / "metrics.jsonl", "a") as f:
        f.write('{"step": 25, "frac_fired": 0.5, "fv')
    tiny_config.train.steps = 30
    with caplog.at_level("WARNING", logger="jumprelu"):
        train(tiny_config, str(wd))
    assert "metrics.jsonl: dropped 1 unreadable line(s)" in caplog.text
    assert [r["step"] for r in read_jsonl(wd / "metrics.jsonl")] == [5, 10, 15, 20, 25, 30]


def test_metrics_write_on_a_full_disk_leaves_whole_lines(tmp_path, monkeypatch):
    log = metrics_log.MetricsLog(str(tmp_path), resume_step=0)
    log.write({"step": 1})
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(metrics_log.os, "write", half_then_full)
    log.write({"step": 2})  # no exception: training goes on
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    monkeypatch.setattr(metrics_log.os, "write", real_write)
    log.write({"step": 3})  # space again: the waiting record goes first
    log.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def _damage_newest(wd, step):
    for root, _, files in os.walk(wd / "checkpoints" / str(step) / "sae"):
        for f in files:
            if "ocdbt" in root:
                (lambda p: open(p, "r+b").truncate(10))(os.path.join(root, f))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's abandoned read coroutine
def test_damaged_newest_checkpoint_falls_back(tmp_path, tiny_config, caplog):
    """Item 6: load and resume skip the damaged step 40, say so and why, and use step 20."""
    wd = tmp_path / "run"
    train(tiny_config, str(wd))
    _damage_newest(wd, 40)
    with caplog.at_level("WARNING", logger="jumprelu"):
        sae = jumprelu.load(str(wd))
    assert sae.step == 20
    assert f"checkpoint {wd / 'checkpoints' / '40'} is damaged: it cannot be read (" in caplog.text
    with pytest.raises(ValueError, match="member=1 given, but this run trained one SAE, not a stack"):
        jumprelu.load(str(wd), member=1)
    with pytest.raises(CheckpointError, match=r"checkpoint .*/40 is damaged: it cannot be read") as e:
        jumprelu.load(str(wd), step=40)
    assert "\n" not in str(e.value)
    # the cause tensorstore gives (its status line), not orbax's wrapper with a tensorstore spec's repr
    assert "OUT_OF_RANGE: Error reading" in str(e.value) and "TensorStore details" not in str(e.value)
    caplog.clear()
    tiny_config.train.steps = 60
    with caplog.at_level("WARNING", logger="jumprelu"):
        report = train(tiny_config, str(wd))
    assert report["resumed_from_step"] == 20 and report["steps"] == 60
    assert f"checkpoint {wd / 'checkpoints' / '40'} is damaged (it cannot be read: " in caplog.text
    assert (wd / "checkpoints-damaged" / "40").is_dir()  # set aside, never deleted
    assert _steps(wd) == [60, 40, 20]
    _assert_finite(wd)


def test_the_command_resuming_past_a_damaged_checkpoint_prints_no_traceback(tmp_path):
    """orbax abandons its other reads of a damaged checkpoint and shuts its event loop; tensorstore's
    threads then reported "Event loop is closed", a traceback each, before the one warning line."""
    wd = tmp_path / "run"
    assert run_main(wd, "--config.train.steps=40").returncode == 0
    _damage_newest(wd, 40)
    out = run_main(wd, "--config.train.steps=60")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"checkpoint {wd / 'checkpoints' / '40'} is damaged (it cannot be read" in out.stderr
    assert "resumed from" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    # those reports come when the threads lose the race (about every other run): the hook itself
    from jumprelu.cli import common

    previous, seen = sys.unraisablehook, []
    sys.unraisablehook = seen.append
    try:
        common.quiet_orbax_teardown()
        for error in (RuntimeError("Event loop is closed"), RuntimeError("another")):
            report = types.SimpleNamespace(exc_type=RuntimeError, exc_value=error, exc_traceback=None, object=None)
            sys.unraisablehook(report)
    finally:
        sys.unraisablehook = previous
    assert [str(r.exc_value) for r in seen] == ["another"]


def test_a_save_killed_mid_write_leaves_no_folder_behind_after_resume(tmp_path, tiny_config):
    """The temporary folder of a save that a kill interrupted is removed when training reopens the
    checkpoints, not kept beside them for good (it is never read, nor reused: each save names its own)."""
    wd = tmp_path / "run"
    train(tiny_config, str(wd))
    orphan = wd / "checkpoints" / "60.orbax-checkpoint-tmp-1764835200000000"
    (orphan / "sae").mkdir(parents=True)
    (orphan / "sae" / "part").write_bytes(b"\0" * 1024)
    tiny_config.train.steps = 60
    assert train(tiny_config, str(wd))["resumed_from_step"] == 40
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["20", "40", "60"]


def test_checkpoint_on_a_full_disk_is_one_line(tmp_path, tiny_config, monkeypatch):
    """Item 7: a save that fails (here the first one after step 20) names the step and the last complete one."""
    real_save = ocp.CheckpointManager.save

    def save(self, step, *a, **kw):
        if step == 40:
            raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "x": No space left on device [OS error]')
        return real_save(self, step, *a, **kw)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    wd = tmp_path / "run"
    with pytest.raises(CheckpointError) as e:
        train(tiny_config, str(wd))
    assert str(e.value) == (
        f"cannot write checkpoint 40 in {wd / 'checkpoints'}: No space left on device; the last complete "
        f"checkpoint is {wd / 'checkpoints' / '20'}; free some space and run the same command again: it resumes "
        "from there"
    )
    assert _steps(wd) == [20] and not (wd / "lock.json").exists()


def test_resume_refuses_a_change_in_which_rows_a_step_sees(tmp_path, tiny_config):
    """Item 8: batch size, data seed, held-out rows and block size are part of the resume guard."""
    tiny_config.train.steps = 20
    train(tiny_config, str(tmp_path / "run"))
    for section, field, value in [("train", "batch_size", 64), ("data", "seed", 1), ("data", "eval_rows", 256)]:
        changed = tiny_config.copy_and_resolve_references()
        changed[section][field] = value
        with pytest.raises(ConfigError, match=f"config field {section}.{field} is {value} but the checkpoint"):
            train(changed, str(tmp_path / "run"))
    # the input scale is chosen at step 0: a new one on resume was silently ignored (config.json said it)
    for field, value, message in [
        ("normalize", False, "config field data.normalize is False but the checkpoint"),
        ("scale", 100.0, r"data.scale is 100.0 but the checkpoint .* trained with None \(None: the store's C\)"),
    ]:
        changed = tiny_config.copy_and_resolve_references()
        changed.data[field] = value
        with pytest.raises(ConfigError, match=message):
            train(changed, str(tmp_path / "run"))
    tiny_config.data.block_bytes = 1024
    with pytest.raises(ConfigError, match="data.block_bytes is 1024 but the checkpoint .* with 524288; set it back"):
        train(tiny_config, str(tmp_path / "run"))


def test_resume_knows_the_same_store_by_another_spelling_and_refuses_another_store(tmp_path, tiny_config, monkeypatch):
    rows = np.random.default_rng(0).standard_normal((3000, 32)).astype(np.float32)
    for name, scale in (("st", 1), ("other", 2)):
        w = StoreWriter(str(tmp_path / name), d_model=32, shuffle_seed=None)
        w.append(rows * scale)
        w.close()
    monkeypatch.chdir(tmp_path)
    tiny_config.data.source, tiny_config.train.steps = "st", 20
    train(tiny_config, str(tmp_path / "run"))
    tiny_config.data.source, tiny_config.train.steps = str(tmp_path / "st"), 40  # the same store, absolute
    assert train(tiny_config, str(tmp_path / "run"))["resumed_from_step"] == 20
    tiny_config.data.source, tiny_config.train.steps = str(tmp_path / "other"), 60  # other rows
    with pytest.raises(ConfigError, match=f"config field data.source is '{tmp_path / 'other'}' but the checkpoint"):
        train(tiny_config, str(tmp_path / "run"))
    # the store moved (an audit: refused with "set it back", which the move made impossible): its
    # metadata holds the fingerprint of the rows the run recorded, so it resumes
    (tmp_path / "st").rename(tmp_path / "moved")
    tiny_config.data.source = str(tmp_path / "moved")
    assert train(tiny_config, str(tmp_path / "run"))["resumed_from_step"] == 40


def test_sigint_sets_the_stop_and_handlers_come_back():
    before = signal.getsignal(signal.SIGINT)
    with Watch() as watch:
        assert not watch.requested(1, sync_step=True)
        os.kill(os.getpid(), signal.SIGINT)
        assert watch.requested(2, sync_step=False) and watch.signal_name == "SIGINT"
        assert signal.getsignal(signal.SIGINT) is before  # a second Ctrl-C interrupts at once
    assert signal.getsignal(signal.SIGINT) is before and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def _bad_metadata_store(path):
    w = StoreWriter(str(path), d_model=4)
    w.append(np.ones((10, 4), np.float32))
    w.close()
    meta = json.loads((path / "metadata.json").read_text())
    (path / "metadata.json").write_text(json.dumps(dict(meta, shards=meta["shards"][0])))


@pytest.mark.parametrize(
    "case,expected",
    [
        ("--config.train.foo=1", "flag --config.train.foo=1: the config has no field train.foo"),
        ("--config.train.lr=inf", "config field train.lr must be finite, found inf"),
        ("missing_config", "no experiment '/nonexistent/exp.py': not a file"),
        ("workdir_file", "is not a directory (a file is in the way)"),
        ("bad_metadata", "metadata.json field shards must be a non-empty list, found {"),
    ],
)
def test_each_bad_input_gives_exactly_one_line(tmp_path, case, expected):
    """Item 7, through the command: exit 2, one line on stderr, nothing else."""
    wd, extra = tmp_path / "run", [case]
    if case == "missing_config":
        cmd = [sys.executable, "-m", "jumprelu", "train", "--config", "/nonexistent/exp.py", "--workdir", str(wd)]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    else:
        if case == "workdir_file":
            wd.write_text("")
            extra = []
        elif case == "bad_metadata":
            _bad_metadata_store(tmp_path / "s")
            extra = [f"--config.data.source={tmp_path / 's'}"]
        r = run_main(wd, *extra)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jumprelu: error: ") and expected in lines[0], r.stderr[-2000:]
    assert TINY_FLAGS  # the flags of the tiny run, shared with test_train


@pytest.mark.parametrize("position", [28, "x"])
def test_a_data_position_that_disagrees_with_its_step_is_a_damaged_checkpoint(tmp_path, tiny_config, caplog, position):
    """A data item that parses but holds another position (or not a number) was caught only later,
    outside the fallback: a RuntimeError or TypeError traceback instead of using step 20."""
    wd = tmp_path / "run"
    train(tiny_config, str(wd))
    (wd / "checkpoints" / "40" / "data" / "process_0-of-1.json").write_text(json.dumps({"next_index": position}))
    tiny_config.train.steps = 60
    with caplog.at_level("WARNING", logger="jumprelu"):
        report = train(tiny_config, str(wd))
    assert report["resumed_from_step"] == 20
    assert f"holds the data position {position!r}, not this step's 40" in caplog.text
    assert (wd / "checkpoints-damaged" / "40").is_dir()


def test_sigterm_during_the_final_report_still_writes_it(tmp_path):
    """Found by an audit: a SIGTERM after the last checkpoint, while the held-out report was being
    computed, ended the process (exit 143) with no report.json and its lock left behind. The run had
    finished: the report is written, with one warning, and the exit is 0."""
    workdir = tmp_path / "w"
    script = f"""
import os, signal, sys
from jumprelu import cli
from jumprelu.train import report
write = report.final_report
def sigterm_first(*args, **kwargs):  # a scheduler's SIGTERM while the report is computed
    os.kill(os.getpid(), signal.SIGTERM)
    return write(*args, **kwargs)
report.final_report = sigterm_first
sys.exit(cli.main(["train", "--config", "quickstart", "--workdir", {str(workdir)!r}, *{TINY_FLAGS!r},
                   "--config.train.steps=20"]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SIGTERM during the final report: the run had finished, so the report was written first" in done.stderr
    assert json.loads((workdir / "report.json").read_text())["steps"] == 20
    assert not (workdir / "lock.json").exists()


@pytest.mark.parametrize("when", ["after_the_last_step", "after_the_report"])
def test_a_signal_at_the_end_of_a_finished_run_is_exit_0(tmp_path, when):
    """An audit: a SIGTERM the loop noted after its last step's save was dropped without the warning
    (the report's watch was a second one), and one after the report was written, while the command
    printed it, made the finished run exit 143."""
    workdir = tmp_path / "w"
    script = f"""
import os, signal, sys
from jumprelu import cli
from jumprelu.train import loop, report
if {when!r} == "after_the_last_step":
    os.environ["JUMPRELU_KILL_AT_STEP"] = "20"  # read at import: set the module's own
    loop._KILL_AT_STEP, loop._KILL_SIGNAL = 20, signal.SIGTERM
else:
    fmt = report.format_report
    def sigterm_first(result):  # a scheduler's SIGTERM as the command prints the report
        os.kill(os.getpid(), signal.SIGTERM)
        return fmt(result)
    report.format_report = sigterm_first
sys.exit(cli.main(["train", "--config", "quickstart", "--workdir", {str(workdir)!r}, *{TINY_FLAGS!r},
                   "--config.train.steps=20"]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((workdir / "report.json").read_text())["steps"] == 20 and "held-out" in done.stdout
    if when == "after_the_last_step":
        assert "SIGTERM during the final report: the run had finished, so the report was written first" in done.stderr
