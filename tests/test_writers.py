"""Metric writers: TensorBoard event files read back with TensorBoard's own reader hold what
metrics.jsonl holds, resume does not duplicate steps; wandb (a stand-in module); gs:// JSONL."""

import json
import sys
import types

import numpy as np
import pytest

from jumprelu.errors import ConfigError
from jumprelu.train import wandb_writer, writers
from jumprelu.train.loop import train
from tests.test_train import read_jsonl, run_main


def _accumulator(logdir):
    ea = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="tensorboard (the gemma extra) is not installed: its event reader checks our files",
    )
    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc


def test_tensorboard_holds_the_jsonl_scalars_and_resume_does_not_duplicate_steps(tmp_path):
    wd = tmp_path / "run"
    # Killed at step 30 (checkpoint at 20): steps 25 and 30 were logged, then the run resumes from 20.
    first = run_main(wd, "--config.train.steps=60", "--config.log.every_steps=5", env={"JUMPRELU_KILL_AT_STEP": "30"})
    assert first.returncode == -9, first.stderr[-3000:]
    second = run_main(wd, "--config.train.steps=60")
    assert second.returncode == 0, second.stderr[-3000:]
    records = read_jsonl(wd / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(5, 61, 5))
    acc = _accumulator(wd)
    keys = [k for k in records[0] if k != "step"]
    assert set(keys) <= set(acc.Tags()["scalars"])
    for key in keys:
        events = acc.Scalars(key)
        assert [e.step for e in events] == [r["step"] for r in records], key
        np.testing.assert_allclose([e.value for e in events], [r[key] for r in records], rtol=1e-6, err_msg=key)
    # Held-out evaluation at each checkpoint (20, 40, 60): scalars and the firing-frequency histogram.
    assert [e.step for e in acc.Scalars("eval/l0")] == [20, 40, 60]
    hist = acc.Histograms("eval/log10_firing_frequency")
    assert [h.step for h in hist] == [20, 40, 60]
    assert hist[-1].histogram_value.num == 64  # one value per latent
    report = json.loads((wd / "report.json").read_text())
    np.testing.assert_allclose(acc.Scalars("eval/l0")[-1].value, report["eval"]["l0"], rtol=1e-5)
    assert "config/text_summary" in acc.Tags()["tensors"]


@pytest.mark.parametrize("checkpoint", [20, 0])  # 0: killed before its first checkpoint
def test_tensorboard_writer_purges_what_an_interrupted_run_logged_past_its_checkpoint(tmp_path, checkpoint):
    first = writers.TensorBoardWriter(str(tmp_path), resume_step=0)
    for step in range(1, 31):
        first.write_scalars(step, {"loss": 1.0})
    first.flush()  # on disk, then the process dies without closing
    second = writers.TensorBoardWriter(str(tmp_path), resume_step=checkpoint)
    for step in range(checkpoint + 1, 41):
        second.write_scalars(step, {"loss": 2.0})
    second.close()
    events = _accumulator(tmp_path).Scalars("loss")
    assert [e.step for e in events] == list(range(1, 41))
    assert [e.value for e in events] == [1.0] * checkpoint + [2.0] * (40 - checkpoint)


class _FakeWandb(types.ModuleType):
    """What the writer uses of wandb: init -> run with log/finish, Histogram."""

    def __init__(self):
        super().__init__("wandb")
        self.runs = []

    def init(self, **kwargs):
        run = types.SimpleNamespace(kwargs=kwargs, logged=[], finished=False)
        run.log = lambda data, step: run.logged.append((step, data))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run

    class Histogram:
        def __init__(self, values):
            self.values = values


def test_wandb_gets_scalars_histograms_and_the_config(tmp_path, tiny_config, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tiny_config.log.update(wandb_project="my-project", tensorboard=False)
    train(tiny_config, str(tmp_path / "run"))
    (run,) = fake.runs
    assert run.kwargs["project"] == "my-project" and run.kwargs["resume"] == "allow"
    assert run.kwargs["config"]["sae"]["width"] == 64 and run.finished
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    scalar_steps = [s for s, d in run.logged if "loss" in d]
    assert scalar_steps == [r["step"] for r in records]
    hist_steps = [s for s, d in run.logged if "eval/log10_firing_frequency" in d]
    assert hist_steps == [20, 40]
    # Same workdir, same wandb run id: a resumed run continues it.
    assert run.kwargs["id"] == wandb_writer.WandbWriter(str(tmp_path / "run"), "p", {})._run.kwargs["id"]


def test_wandb_project_without_wandb_is_a_config_error(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    tiny_config.log.wandb_project = "p"
    with pytest.raises(ConfigError, match="log.wandb_project is 'p' but wandb is not installed"):
        train(tiny_config, str(tmp_path / "run"))


def test_wandb_that_cannot_start_or_log_is_one_line_or_one_warning(tmp_path, tiny_config, monkeypatch, caplog):
    """Found by an audit: wandb.init without an API key was a traceback through the loop, and a wandb
    call failing mid-run would have killed the training; TensorBoard's failures were one warning."""

    class NoKey(_FakeWandb):
        def init(self, **kwargs):
            raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])\nmore")

    monkeypatch.setitem(sys.modules, "wandb", NoKey())
    tiny_config.log.update(wandb_project="p", tensorboard=False)
    with pytest.raises(ConfigError, match=r"^config field log.wandb_project is 'p' but wandb could not start a run: "
                       r"api_key not configured \(no-tty\)\. call wandb.login\(key=\[your_api_key\]\); run "
                       r"`wandb login` \(or set WANDB_MODE=offline\), or unset it$"):  # fmt: skip
        train(tiny_config, str(tmp_path / "run"))

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    real_init = fake.init

    def init_then_fail(**kwargs):
        run = real_init(**kwargs)

        def log(data, step):
            if step >= 20:
                raise ConnectionError("wandb service unreachable")
            run.logged.append((step, data))

        run.log = log
        return run

    fake.init = init_then_fail
    report = train(tiny_config, str(tmp_path / "run2"))
    assert report["steps"] == tiny_config.train.steps  # trained to the end
    (run,) = fake.runs
    assert [s for s, _ in run.logged] == [5, 10, 15] and run.finished
    assert sum("no more wandb logging this run" in r.getMessage() for r in caplog.records) == 1
    assert len(read_jsonl(tmp_path / "run2" / "metrics.jsonl")) == tiny_config.train.steps // 5


def test_tensorboard_without_tensorboardx_is_a_config_error(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import tensorboardX raises ImportError
    with pytest.raises(ConfigError, match="log.tensorboard is true but tensorboardX is not installed"):
        train(tiny_config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_only_the_lead_process_writes(tmp_path, tiny_config):
    assert writers.create(tiny_config.log, str(tmp_path), 0, lead=False, config={}).writers == []
    assert list(tmp_path.iterdir()) == []


def test_remote_jsonl_is_rewritten_at_flushes_not_at_every_log_step(monkeypatch):
    store = {"gs://b/run/metrics.jsonl": json.dumps({"step": 10, "loss": 1}) + "\n" + json.dumps({"step": 20}) + "\n"}
    writes = []
    monkeypatch.setattr(writers, "read_metrics", lambda p: [json.loads(line) for line in store[p].splitlines()])

    def write(path, text):
        writes.append(path)
        store[path] = text

    monkeypatch.setattr(writers.fs, "write_text_atomically", write)
    w = writers.JsonlWriter("gs://b/run", resume_step=10)  # drops step 20, written after the checkpoint
    assert len(writes) == 1
    for step in range(11, 31):
        w.write_scalars(step, {"loss": float(step)})
    assert len(writes) == 1
    w.flush()
    w.flush()  # nothing new: no rewrite
    w.close()
    assert len(writes) == 2
    steps = [json.loads(line)["step"] for line in store["gs://b/run/metrics.jsonl"].splitlines()]
    assert steps == [10, *range(11, 31)]


def test_a_full_disk_under_tensorboard_ends_its_events_not_the_run(tmp_path, tiny_config, monkeypatch, caplog):
    """TensorBoard is on by default: its writer hitting a full disk stopped training with a traceback,
    while metrics.jsonl and the checkpoints are written to survive one."""
    import errno
    import os

    from tensorboardX.event_file_writer import EventsWriter

    real = EventsWriter.write_event
    calls = []

    def fills_the_disk(self, event):
        calls.append(event.step)
        if event.step >= 15:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, event)

    monkeypatch.setattr(EventsWriter, "write_event", fills_the_disk)
    with caplog.at_level("WARNING", logger="jumprelu"):
        train(tiny_config, str(tmp_path / "run"))
    assert "TensorBoard events in" in caplog.text and "No space left on device" in caplog.text
    assert caplog.text.count("TensorBoard events in") == 1  # one warning, then no more attempts
    assert max(calls) == 15
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == list(range(5, 41, 5))


def test_the_train_and_store_commands_report_a_full_disk_and_ctrl_c_in_one_line(tmp_path):
    """config.json (or the report) on a full disk, and Ctrl-C in `store convert`: one line each with
    what running the command again does, not a traceback."""
    import subprocess

    script = """
import errno, os, sys
from jumprelu import fs
real = fs.write_text_atomically
def full(path, text):
    if path.endswith("config.json"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return real(path, text)
fs.write_text_atomically = full
from jumprelu.cli import main
sys.exit(main(sys.argv[1:]))
"""
    wd = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-c", script, "train", "--config=quickstart:runlocal", f"--workdir={wd}",
         "--config.log.progress=False"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"jumprelu: error: {wd / 'config.json'}: No space left on device; free some space and run "
        "the same command again: it resumes from its last checkpoint"
    ), out.stderr[-2000:]
    assert "Traceback" not in out.stderr

    np.save(tmp_path / "acts.npy", np.ones((64, 8), np.float32))
    script = """
import sys
from jumprelu.store import writer
def ctrl_c(self, rows):
    raise KeyboardInterrupt
writer.StoreWriter.append = ctrl_c
from jumprelu.cli import main
sys.exit(main(sys.argv[1:]))
"""
    out = subprocess.run(
        [sys.executable, "-c", script, "store", "convert", str(tmp_path / "acts.npy"), str(tmp_path / "s")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 130, out.stderr
    assert out.stderr.strip() == (
        "jumprelu: interrupted; run the same command again: a conversion resumes after its last complete shard"
    )
