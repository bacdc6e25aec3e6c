"""The real training entry point on a tiny config: it learns, checkpoints, resumes, loads."""

import json
import logging
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jumprelu
from jumprelu.config import ConfigError
from jumprelu.core.kinds.jumprelu import JumpReLUSAE
from jumprelu.errors import DataError
from jumprelu.store import StoreWriter
from jumprelu.train.checkpoint import Checkpointer
from jumprelu.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = [
    "--config.data.synthetic.d_model=32",
    "--config.data.synthetic.num_features=48",
    "--config.data.synthetic.rows=4096",
    "--config.data.eval_rows=512",
    "--config.sae.width=64",
    "--config.sae.sparsity_coefficient=0.01",
    "--config.sae.threshold_init=0.05",
    "--config.train.batch_size=128",
    "--config.train.lr=0.003",
    "--config.train.lr_warmup_steps=10",
    "--config.train.sparsity_warmup_steps=20",
    "--config.ckpt.every_steps=20",
    "--config.log.every_steps=5",
    "--config.log.progress=False",
]


def run_main(workdir, *extra, env=None):
    cmd = [sys.executable, "-m", "jumprelu", "train", "--config", "quickstart", "--workdir", str(workdir)]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", **(env or {}))
    return subprocess.run(
        cmd + TINY_FLAGS + list(extra), cwd=ROOT, capture_output=True, text=True, env=env, timeout=300
    )


def read_jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def test_main_trains_checkpoints_and_resumes(tmp_path, caplog):
    wd = tmp_path / "run"
    first = run_main(wd, "--config.train.steps=60", "--config.train.lr-warmup-steps=7")  # a dashed name too
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((wd / "config.json").read_text())["train"]["lr_warmup_steps"] == 7
    assert "checkpoint:" in first.stdout and "true features recovered" in first.stdout
    records = read_jsonl(wd / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(5, 61, 5))
    assert records[-1]["mse"] < 0.5 * records[0]["mse"]  # it learns
    with caplog.at_level(logging.WARNING):
        assert Checkpointer(str(wd), keep=3, read_only=True).latest_step() == 60
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]  # a reader is no warning
    assert (wd / "training_curves.png").stat().st_size > 1000

    second = run_main(wd, "--config.train.steps=80")  # same workdir: resumes at 60
    assert second.returncode == 0, second.stderr[-3000:]
    report = json.loads((wd / "report.json").read_text())
    assert report["resumed_from_step"] == 60 and report["steps"] == 80
    steps = [r["step"] for r in read_jsonl(wd / "metrics.jsonl")]
    assert steps == list(range(5, 81, 5))  # continued at the right step, no duplicates
    assert Checkpointer(str(wd), keep=3, read_only=True).latest_step() == 80


def train_straight_and_resumed(config, tmp_path):
    """config.train.steps straight in tmp_path/a; in tmp_path/b half of them, a stop, and a
    resume to the end. Returns both reports."""
    steps = config.train.steps
    straight = train(config, str(tmp_path / "a"))
    config.train.steps = steps // 2
    train(config, str(tmp_path / "b"))
    config.train.steps = steps
    resumed = train(config, str(tmp_path / "b"))
    assert resumed["resumed_from_step"] == steps // 2
    return straight, resumed


def test_resume_continues_exactly(tmp_path, tiny_config):
    """40 steps straight == 20 steps, stop, 20 more from the checkpoint: bit-identical."""
    straight, resumed = train_straight_and_resumed(tiny_config, tmp_path)
    a, b = jumprelu.load(str(tmp_path / "a")), jumprelu.load(str(tmp_path / "b"))
    for k, v in a.params().items():
        np.testing.assert_array_equal(v, b.params()[k], err_msg=k)
    assert straight["eval"] == resumed["eval"]


def test_load_reproduces_training_time_reconstruction(tmp_path, tiny_config, monkeypatch):
    wd = str(tmp_path / "run")
    train(tiny_config, wd)
    sae = jumprelu.load(wd)
    assert (sae.d_model, sae.width, sae.step) == (32, 64, 40)
    # Training-time forward pass, straight from the checkpoint, in normalised units.
    ckpt = Checkpointer(wd, keep=1, read_only=True)
    model = JumpReLUSAE(d_model=32, width=64, threshold_init=0.05)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32)))["params"]
    params, scale, _ = ckpt.restore_sae(abstract, jax.ShapeDtypeStruct((), jnp.float32))
    x = np.random.default_rng(0).standard_normal((100, 32)).astype(np.float32) * float(scale)
    out = model.apply({"params": params}, x / scale)
    np.testing.assert_allclose(sae(x), out["x_hat"] * scale, rtol=1e-4, atol=1e-4 * float(scale))
    np.testing.assert_allclose(sae.encode(x), out["f"] * scale, rtol=1e-4, atol=1e-4 * float(scale))
    np.testing.assert_allclose(sae.decode(sae.encode(x)), sae(x))
    # "~" is the home directory, as in a shell (an audit: it was looked up as a folder named "~")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert jumprelu.load("~/run").step == 40
    with pytest.raises(FileNotFoundError, match="nowhere: no such directory; expected a jumprelu training workdir"):
        jumprelu.load(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no checkpoints/ directory"):
        jumprelu.load(str(tmp_path / "empty"))


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("sae.sparsity_coefficient", -1.0, "sae.sparsity_coefficient must be >= 0"),
        ("sae.bandwidth", -0.001, "sae.bandwidth must be > 0"),
        ("sae.bandwidth", 0.0, "sae.bandwidth must be > 0"),
        ("sae.width", 0, "sae.width must be a positive integer"),
        ("train.batch_size", -4, "train.batch_size must be a positive integer"),
        ("train.batch_size", 0, "train.batch_size must be a positive integer"),
        ("train.steps", 0, "train.steps must be a positive integer"),  # saved nothing, reported checkpoints/0
        ("data.seed", -1, "data.seed must be an integer >= 0"),  # numpy's traceback before
        ("train.seed", -2, "train.seed must be an integer >= 0"),
        # an audit: one held-out row has no spread, and its FVU was reported as 2.6e30
        ("data.eval_rows", 1, "data.eval_rows must be 0 \\(no held-out report\\) or >= 2, found 1"),
        ("data.eval_rows", -1, "data.eval_rows must be 0 \\(no held-out report\\) or >= 2, found -1"),
        ("mesh.data", 16, "exceeds the 8 available devices"),
        ("sae.width", 63, "sae.width=63 is not divisible by mesh.model=2"),
    ],
)
def test_bad_config_fails_before_training(tmp_path, tiny_config, field, value, message):
    section, key = field.split(".")
    tiny_config[section][key] = value
    if field == "sae.width" and value == 63:
        tiny_config.mesh.model = 2
    with pytest.raises(ConfigError, match=message) as e:
        train(tiny_config, str(tmp_path / "run"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_data_source_fails_before_training(tmp_path, tiny_config):
    (tmp_path / "store").mkdir()
    tiny_config.data.source = str(tmp_path / "store")
    with pytest.raises(DataError, match="store .*store: not an activation store"):
        train(tiny_config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_main_prints_one_line_errors(tmp_path):
    r = run_main(tmp_path / "run", "--config.sae.bandwidth=-1")
    assert r.returncode == 2
    assert r.stderr.strip() == "jumprelu: error: config field sae.bandwidth must be > 0, found -1.0"
    w = StoreWriter(str(tmp_path / "nan_store"), d_model=3)
    w.append(np.full((20, 3), np.nan, np.float32))
    w.append(np.ones((20, 3), np.float32))
    w.close()
    r = run_main(tmp_path / "run", f"--config.data.source={tmp_path / 'nan_store'}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "nan_store: 20 rows hold NaN or Inf" in r.stderr


def test_resume_with_a_different_width_is_refused(tmp_path, tiny_config):
    train(tiny_config, str(tmp_path / "run"))
    tiny_config.sae.width = 128
    with pytest.raises(ConfigError, match="sae.width is 128 but the checkpoint .* was trained with 64"):
        train(tiny_config, str(tmp_path / "run"))


def test_resuming_with_fewer_steps_than_the_checkpoint_is_refused(tmp_path, tiny_config):
    """It failed inside the data pipeline (an on-the-fly run silently did nothing)."""
    train(tiny_config, str(tmp_path / "run"))  # 40 steps
    tiny_config.train.steps = 30
    with pytest.raises(ConfigError, match=r"train.steps is 30, but the workdir's newest checkpoint .*/40 is past it"):
        train(tiny_config, str(tmp_path / "run"))
    tiny_config.train.steps = 40  # the same length: nothing left to train, the report again
    assert train(tiny_config, str(tmp_path / "run"))["steps"] == 40


def test_switching_an_option_that_changes_the_saved_state_is_refused(tmp_path, tiny_config):
    """Switching the update clip on added an optimizer-state entry, and every checkpoint then failed
    to restore and was set aside as damaged; now it is a one-line refusal, nothing is set aside, and
    with the option set back the run resumes."""
    train(tiny_config, str(tmp_path / "run"))
    tiny_config.train.update(adam_update_clip=3.0, steps=60)
    with pytest.raises(ConfigError) as e:
        train(tiny_config, str(tmp_path / "run"))
    assert str(e.value) == (
        f"config field train.adam_update_clip is 3.0 but the checkpoint in {tmp_path / 'run' / 'checkpoints'} was "
        "trained with 0.0: switching it on changes the saved state; set it back or use a new --workdir"
    )
    assert not (tmp_path / "run" / "checkpoints-damaged").exists()
    tiny_config.train.adam_update_clip = 0.0
    assert train(tiny_config, str(tmp_path / "run"))["steps"] == 60


def test_store_source_trains(tmp_path, tiny_config):
    rows = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float16) * 50
    np.save(tmp_path / "acts.npy", rows)
    convert = [sys.executable, "-m", "jumprelu", "store", "convert", str(tmp_path / "acts.npy"), str(tmp_path / "s")]
    assert subprocess.run(convert + ["--dtype=bfloat16"], cwd=ROOT, capture_output=True).returncode == 0
    tiny_config.data.source = str(tmp_path / "s")
    tiny_config.train.steps = 10
    r = train(tiny_config, str(tmp_path / "run"))
    assert r["steps"] == 10 and "features_recovered" not in r
    np.testing.assert_allclose(r["scale"], np.sqrt(np.mean(np.sum(rows.astype(np.float64) ** 2, 1))), rtol=0.01)
    assert np.isfinite(r["eval"]["fvu"])


def test_killed_run_resumes_with_the_same_batches(tmp_path):
    """SIGKILL at step 30 of 40 (checkpoint at 20), and SIGTERM after step 30 (issue 15, item 3: it saves
    step 31 and exits 75); each resumed run ends bit-identical to an unbroken one."""
    flags = ["--config.train.steps=40", "--config.data.block_bytes=512"]
    straight = run_main(tmp_path / "a", *flags)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run_main(tmp_path / "b", *flags, env={"JUMPRELU_KILL_AT_STEP": "30"})
    assert killed.returncode == -signal.SIGKILL
    assert Checkpointer(str(tmp_path / "b"), keep=3, read_only=True).latest_step() == 20
    termed = run_main(tmp_path / "c", *flags, env={"JUMPRELU_KILL_AT_STEP": "30", "JUMPRELU_KILL_SIGNAL": "SIGTERM"})
    assert termed.returncode == 75, termed.stderr[-3000:]
    assert termed.stderr.strip().splitlines()[-1] == (
        f"jumprelu: stopped by SIGTERM at step 31: saved {tmp_path / 'c' / 'checkpoints' / '31'}; "
        "run the same command again to resume"
    )
    assert Checkpointer(str(tmp_path / "c"), keep=3, read_only=True).latest_step() == 31
    for wd, start in (("b", 20), ("c", 31)):
        resumed = run_main(tmp_path / wd, *flags)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert json.loads((tmp_path / wd / "report.json").read_text())["resumed_from_step"] == start
        state = json.loads((tmp_path / wd / "checkpoints" / "40" / "data" / "process_0-of-1.json").read_text())
        assert state == {"next_index": 40}
        a, b = jumprelu.load(str(tmp_path / "a")), jumprelu.load(str(tmp_path / wd))
        for k, v in a.params().items():
            np.testing.assert_array_equal(v, b.params()[k], err_msg=k)
        # The metrics after the resume match the unbroken run's exactly.
        after = lambda d: [r for r in read_jsonl(d / "metrics.jsonl") if r["step"] > 20]  # noqa: E731
        strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rs]  # noqa: E731
        assert strip(after(tmp_path / "a")) == strip(after(tmp_path / wd))


@pytest.mark.parametrize("precision", ["default", "highest"])
def test_the_run_is_traced_at_its_matmul_precision(tmp_path, tiny_config, monkeypatch, precision):
    """sae.matmul_precision holds while the run builds and traces its programs, and only then."""
    from jumprelu.train import loop

    seen, outside = [], jax.config.jax_default_matmul_precision  # JAX_DEFAULT_MATMUL_PRECISION, if set
    monkeypatch.setattr(loop, "_train_on", lambda *args: seen.append(jax.config.jax_default_matmul_precision) or {})
    tiny_config.sae.matmul_precision = precision
    train(tiny_config, str(tmp_path / "run"))
    assert seen == [outside if precision == "default" else precision]
    assert jax.config.jax_default_matmul_precision == outside


def test_an_unknown_matmul_precision_is_named(tmp_path, tiny_config):
    tiny_config.sae.matmul_precision = "fast"
    expected = r"^config field sae.matmul_precision must be one of \('default', 'high', 'highest'\), found 'fast'$"
    with pytest.raises(ConfigError, match=expected):
        train(tiny_config, str(tmp_path / "run"))
