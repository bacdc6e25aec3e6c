"""On-the-fly training (data.source "lm"): the shuffle buffer, the LM's rows against the harvest's,
the real CLI end to end, kill -9 resume bitwise equal to an unbroken run, one-line errors."""

import json
import os
import signal
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from jumprelu.data.shuffle import BufferBatches, ShuffleBuffer
from jumprelu.errors import ConfigError, DataError
from tests.test_train import ROOT, read_jsonl


class CountingRows:
    """A producer whose rows say where they came from: row = (producer row index, chunk)."""

    d_model = 2

    def __init__(self, sizes=(5, 0, 3, 7, 1, 4)):
        self.sizes = sizes
        self.computed = 0  # chunks whose rows were produced

    def _size(self, g):
        return self.sizes[g % len(self.sizes)]

    def chunks(self, start):
        first = sum(self._size(g) for g in range(start))
        g = start
        while True:
            n = self._size(g)
            self.computed += 1
            yield np.stack([np.arange(first, first + n), np.full(n, g)], axis=1).astype(np.float32)
            first, g = first + n, g + 1

    def chunk_sizes(self):
        g = 0
        while True:
            yield self._size(g)
            g += 1


def _batches(buffer, start=0, num=40):
    return BufferBatches(buffer, batch_size=6, part=slice(None), num_batches=num, start=start)


def test_windows_are_seeded_permutations_of_consecutive_rows():
    buffer = ShuffleBuffer(CountingRows(), window_rows=11, seed=3)
    rows = np.concatenate(list(_batches(buffer)))[:, 0]
    buffer.close()
    assert len(rows) == 240
    for w in range(len(rows) // 11):  # each window holds rows [11w, 11w + 11) once, shuffled
        window = rows[11 * w : 11 * w + 11]
        assert sorted(window) == list(range(11 * w, 11 * w + 11))
    assert not np.array_equal(rows[:11], np.arange(11))
    other = ShuffleBuffer(CountingRows(), window_rows=11, seed=4)
    assert not np.array_equal(np.concatenate(list(_batches(other)))[:, 0], rows)
    other.close()


def test_a_restored_state_continues_with_the_same_batches_recomputing_one_window():
    straight = ShuffleBuffer(CountingRows(), window_rows=11, seed=0)
    it = _batches(straight)
    expected = [next(it) for _ in range(40)]
    straight.close()
    for k in (0, 7, 13, 39):  # mid-window, at chunk boundaries, near the end
        buffer = ShuffleBuffer(CountingRows(), window_rows=11, seed=0)
        it = _batches(buffer)
        for _ in range(k):
            next(it)
        state = json.dumps(it.get_state()).encode()  # as Grain's handler writes and reads it
        buffer.close()
        producer = CountingRows()
        resumed = _batches(ShuffleBuffer(producer, window_rows=11, seed=0))
        resumed.set_state(state)
        got = next(resumed)
        np.testing.assert_array_equal(got, expected[k])
        # The cursor puts the producer at the window's chunk: one window (plus the prefetched
        # next one) is recomputed, not the rows before it.
        assert producer.computed <= 2 * (11 + 1)
        for j in range(k + 1, 40):
            np.testing.assert_array_equal(next(resumed), expected[j])
        resumed.buffer.close()
        # A state with only the batch index is located from the chunk sizes: the same batches.
        located = _batches(ShuffleBuffer(CountingRows(), window_rows=11, seed=0))
        located.set_state({"next_index": k})
        np.testing.assert_array_equal(next(located), expected[k])
        located.buffer.close()


# --- the tiny Gemma 2 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    pytest.importorskip("gemma")
    pytest.importorskip("sentencepiece")
    from jumprelu.harvest import tiny

    d = tmp_path_factory.mktemp("otf")
    tiny.make(str(d))
    return d


def _cfg(world, **data):
    from jumprelu.experiments.onthefly import get_config

    c = get_config(f"tiny={world}")
    c.log.progress = False
    c.data.update(data)
    return ml_collections.ConfigDict(c.to_dict())


def test_rows_are_the_harvests_rows_and_c_is_from_the_first_training_rows(world, tmp_path):
    from jumprelu.experiments.harvest.gemma2 import get_config
    from jumprelu.harvest import contexts, onthefly
    from jumprelu.harvest.run import harvest
    from jumprelu.store import open_store

    hcfg = get_config(f"tiny={world}")
    hcfg.progress, hcfg.store = False, str(tmp_path / "store")
    harvest(hcfg)
    store = open_store(str(tmp_path / "store"))
    n = sum(store.shard_rows)
    coords = np.concatenate([np.stack([np.full(r, s), np.arange(r)], 1) for s, r in enumerate(store.shard_rows)])
    harvested = np.empty((n, store.d_model), np.float32)  # in harvest order, the writer's shuffle undone
    harvested[contexts.harvest_rows(store.metadata, coords)] = np.concatenate(
        [store.shard(s) for s in range(len(store.shard_rows))]
    )
    cfg = _cfg(world, eval_rows=100, scale_rows=500, shuffle_buffer_rows=1000)
    rows = onthefly.open_rows(cfg.data)
    try:
        assert rows.num_train_rows == n - 100
        np.testing.assert_allclose(rows.eval_set(), harvested[:100], rtol=1e-5, atol=1e-5)
        first = rows.producer.first_rows(n - 100)
        np.testing.assert_allclose(first, harvested[100:], rtol=1e-5, atol=1e-5)
        expected_c = np.sqrt(np.mean(np.sum(harvested[100:600].astype(np.float64) ** 2, 1)))
        assert rows.scale == pytest.approx(expected_c, rel=1e-6)
        # The stream's first window is those rows shuffled; the next pass repeats them.
        window = rows.read(0, 1000)
        order = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
        np.testing.assert_allclose(order(window), order(first[:1000]), rtol=1e-5, atol=1e-5)
        assert not np.allclose(window, first[:1000])
        second_pass = rows.producer.first_rows(2 * (n - 100))[
            n - 100 :
        ]  # the texts again, held-out rows again left out
        np.testing.assert_array_equal(second_pass, first)
    finally:
        rows.close()


def test_the_lm_keeps_its_precision_on_every_thread_whatever_the_sae_s(world):
    """A run traces its SAE at sae.matmul_precision (thread-local, jumprelu.train.loop); the model's
    rows, computed on the main thread (C, held-out rows) and the shuffle worker (training rows) alike,
    keep the precision in force where the rows were opened."""
    from jumprelu.harvest import onthefly

    outside = jax.config.jax_default_matmul_precision  # JAX_DEFAULT_MATMUL_PRECISION, if set
    rows = onthefly.open_rows(_cfg(world, eval_rows=100, scale_rows=500, shuffle_buffer_rows=1000).data)
    try:
        seen, run = [], rows.producer._run

        def recording(*args):
            seen.append(jax.config.jax_default_matmul_precision)
            return run(*args)

        rows.producer._run = recording
        with jax.default_matmul_precision("highest"):  # as the training loop holds it
            rows.eval_set()
            rows.read(0, 1000)
        assert len(seen) > 2 and set(seen) == {outside}, seen
        assert run._cache_size() == 1  # one compiled forward for both threads
    finally:
        rows.close()


def _train_cmd(world, workdir):
    cmd = [sys.executable, "-m", "jumprelu", "train", "--config", f"onthefly:tiny={world}", "--workdir", str(workdir)]
    # 60 steps × 256 rows: more than one pass of the tiny texts (~9,000 rows), windows cut mid-chunk.
    return cmd + [
        "--config.train.steps=60",
        "--config.train.batch_size=256",
        "--config.ckpt.every_steps=20",
        "--config.data.shuffle_buffer_rows=1000",
        "--config.log.progress=False",
    ]


def _start(cmd, env=None):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", **(env or {}))
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc):
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run(cmd, env=None):
    return _finish(_start(cmd, env))


def test_cli_trains_from_the_lm_and_resumes_after_kill_9_bit_identically(world, tmp_path):
    import jumprelu
    from jumprelu.cli.evaluate import evaluate_workdir

    # The unbroken and the killed run side by side (they share nothing): the test's wall time.
    procs = [
        _start(_train_cmd(world, tmp_path / "a")),
        _start(_train_cmd(world, tmp_path / "b"), {"JUMPRELU_KILL_AT_STEP": "50"}),
    ]
    (straight, killed) = [_finish(p) for p in procs]
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "held-out (256 tokens)" in straight.stdout
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["tokens"] == 60 * 256 and report["eval"]["fvu"] < 0.5
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["data"]["scale"] == pytest.approx(report["scale"])  # C recorded for export
    assert config["data"]["d_model"] == 64
    assert killed.returncode == -signal.SIGKILL
    resumed = _run(_train_cmd(world, tmp_path / "b"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "report.json").read_text())["resumed_from_step"] == 40
    state = json.loads((tmp_path / "b" / "checkpoints" / "40" / "data" / "process_0-of-1.json").read_text())
    assert state["next_index"] == 40 and state["window"] == 40 * 256 // 1000
    a, b = jumprelu.load(str(tmp_path / "a")), jumprelu.load(str(tmp_path / "b"))
    assert a.scale == b.scale
    for k, v in a.params().items():
        np.testing.assert_array_equal(v, b.params()[k], err_msg=k)
    after = lambda d: [r for r in read_jsonl(d / "metrics.jsonl") if r["step"] > 40]  # noqa: E731
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rs]  # noqa: E731
    assert strip(after(tmp_path / "a")) == strip(after(tmp_path / "b"))
    # `jumprelu evaluate` recomputes the run's held-out rows through the LM: the report's numbers.
    _, result, _ = evaluate_workdir(str(tmp_path / "a"))
    assert result["stored"]["fvu"] == pytest.approx(report["eval"]["fvu"], rel=1e-4)


@pytest.mark.parametrize(
    "data, error, message",
    [
        ({"shuffle_buffer_rows": 0}, ConfigError, "config field data.shuffle_buffer_rows must be a positive integer"),
        ({"lm": {}}, ConfigError, "config field data.lm lacks model, checkpoint"),
        ({"lm.tokenizer": ""}, DataError, "config field data.lm.tokenizer is empty"),
        ({"lm.texts": ("/nonexistent.txt",)}, DataError, "config field data.lm.texts: text source /nonexistent.txt"),
        ({"lm.site": "bogus"}, DataError, "data.lm: config fields site/layer: unknown site 'bogus'"),
        ({"lm.layer": 7}, DataError, "layer 7 is out of range"),
        ({"d_model": 32}, ConfigError, "config field data.d_model is 32 but site resid of layer 1 has width 64"),
        ({"eval_rows": 10**6}, DataError, "data.lm.texts: the texts give"),
    ],
)
def test_bad_config_is_one_line_before_training(world, tmp_path, data, error, message):
    from jumprelu.harvest import onthefly

    cfg = _cfg(world)
    for key, value in data.items():
        section, _, field = key.partition(".")
        if field:
            cfg.data[section][field] = value
        else:
            cfg.data[key] = value
    with pytest.raises(error) as e:
        onthefly.train(cfg, str(tmp_path / "run"))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(tmp_path / "run" / "checkpoints")


def test_lm_source_without_the_lm_and_the_cli_error_are_one_line(world, tmp_path):
    from jumprelu.train import loop

    with pytest.raises(ConfigError, match="run it with `jumprelu train`"):
        loop.train(_cfg(world), str(tmp_path / "run"))
    out = _run([*_train_cmd(world, tmp_path / "cli"), "--config.data.shuffle_buffer_rows=0"])
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "jumprelu: error: config field data.shuffle_buffer_rows must be a positive integer, found 0"
    )


def test_chat_template_is_refused_rather_than_ignored():
    """Found by an audit: `onthefly:...,chat_template=True` trained without the template, silently."""
    from jumprelu.launch import experiment

    module = experiment.load("onthefly")
    with pytest.raises(ConfigError, match="onthefly argument chat_template: on-the-fly training does not apply"):
        module.get_config("tiny=/w,site=resid,layer=1,chat_template=True")
    assert module.get_config("tiny=/w,site=resid,layer=1,chat_template=False").data.source == "lm"
