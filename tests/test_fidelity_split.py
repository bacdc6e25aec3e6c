"""The fidelity benchmark's held-out split: random rows, or whole text windows never trained on."""

import importlib.util
import json
import os
import signal

import numpy as np
import pytest

SPEC = importlib.util.spec_from_file_location(
    "fidelity", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "fidelity.py")
)
fidelity = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(fidelity)


def test_random_rows_split_is_the_seeded_permutation():
    eval_idx, train_idx = fidelity.held_out(1000, 100, seed=3)
    perm = np.random.default_rng(3).permutation(1000)
    np.testing.assert_array_equal(eval_idx, np.sort(perm[:100]))
    np.testing.assert_array_equal(train_idx, np.sort(perm[100:]))


@pytest.mark.parametrize("seed", [0, 28])  # seed 28 holds out the short last block
def test_window_split_holds_out_whole_blocks_that_training_never_touches(seed):
    n, eval_rows, w = 1000, 90, 32  # the last block is short (1000 = 31·32 + 8)
    eval_idx, train_idx = fidelity.held_out(n, eval_rows, seed=seed, window_rows=w)
    assert eval_idx.size == eval_rows and np.all(np.diff(eval_idx) > 0)
    assert not set(eval_idx // w) & set(train_idx // w)  # no window on both sides
    dropped = n - eval_idx.size - train_idx.size
    assert 0 <= dropped < w  # only the unused rest of the last held-out block
    assert np.intersect1d(eval_idx, train_idx).size == 0
    again, _ = fidelity.held_out(n, eval_rows, seed=seed, window_rows=w)
    np.testing.assert_array_equal(eval_idx, again)


def _args(**kw):
    import argparse

    base = dict(width=4096, batch=1024, tokens=2_000_000, seed=0, override=[], refit_rows=131072, refit_ridge=0.01)
    base.update(out="o", matryoshka_frequency_penalty=None, matryoshka_divisors="8,4,2,1", matryoshka_weights="auto")
    return argparse.Namespace(**{**base, **kw})


def test_a_finished_run_is_reused_only_with_the_same_settings():
    """SAELens's rows were keyed without its width, batch or seed, and a refit's without its rows
    and ridge: a rerun with other ones read the old row back under the new settings."""
    sha = fidelity.config_sha
    assert sha("saelens_topk", 50, _args(), "s") == sha("saelens_topk", 50, _args(), "s")
    for change in ({"width": 2048}, {"batch": 512}, {"seed": 1}):
        assert sha("saelens_topk", 50, _args(**change), "s") != sha("saelens_topk", 50, _args(), "s"), change
    assert sha("saelens_topk", 50, _args(), "s") != sha("saelens_jumprelu", 50, _args(), "s")
    assert sha("jumprelu_refit", 50, _args(refit_ridge=1.0), "s") != sha("jumprelu_refit", 50, _args(), "s")
    assert sha("jumprelu", 50, _args(refit_ridge=1.0), "s") == sha("jumprelu", 50, _args(), "s")
    # the refit row refits the plain run: it trained the same SAE again in a directory of its own
    for kind in ("jumprelu", "batchtopk", "matryoshka"):
        assert fidelity.run_dir(f"{kind}_refit", 50, _args(), "s") == fidelity.run_dir(kind, 50, _args(), "s")
    assert fidelity.run_dir("jumprelu", 50, _args(), "s") != fidelity.run_dir("jumprelu", 20, _args(), "s")


def test_a_line_torn_by_a_crash_is_ended_before_the_next(tmp_path):
    path = str(tmp_path / "results.jsonl")
    fidelity.append_line(path, '{"a": 1}')
    with open(path, "a") as f:
        f.write('{"b": 2, "tor')  # the crash
    fidelity.append_line(path, '{"c": 3}')
    assert open(path).read().splitlines() == ['{"a": 1}', '{"b": 2, "tor', '{"c": 3}']


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tokens", "100"], "--tokens 100 is less than one batch of 1024"),
        (["--targets", "0"], "--targets must be L0s between 1 and the width"),
        (["--targets", "20,x"], "--targets must be integers"),
        (["--eval_rows", "0"], "--eval_rows must be > 0"),
        (["--kinds", "topk,saelens_batchtopk"], "--kinds: unknown trainer 'saelens_batchtopk'"),
        # found by an audit: a misspelt field trained the recipe under the override's label
        (["--override", "sae.bandwith=0.05"], "--override sae.bandwith=0.05: the config has no field 'sae.bandwith'"),
        (["--override", "train.lr=-1"], "config field train.lr must be finite and > 0"),
        (["--matryoshka_divisors", "8,0"], "--matryoshka_divisors must be positive integers"),  # was a traceback
    ],
)
def test_bad_arguments_stop_before_any_work(tmp_path, flags, message, capsys, monkeypatch):
    np.save(tmp_path / "x.npy", np.zeros((10, 4), np.float16))
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", ["fidelity.py", str(tmp_path / "x.npy"), "--out", str(out), *flags])
    with pytest.raises(SystemExit) as stop:
        fidelity.main()
    assert stop.value.code == 2 and message in capsys.readouterr().err and not out.exists()
    monkeypatch.setattr("sys.argv", ["fidelity.py", str(tmp_path / "none.npy"), "--out", str(out)])
    with pytest.raises(SystemExit):
        fidelity.main()
    assert "none.npy: no such file" in capsys.readouterr().err


def test_integer_rows_are_refused(tmp_path, capsys, monkeypatch):
    """Found by an audit: a bf16 store's uint16 shard trained on its bit patterns."""
    np.save(tmp_path / "bits.npy", np.ones((10, 4), np.uint16))
    monkeypatch.setattr("sys.argv", ["fidelity.py", str(tmp_path / "bits.npy"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        fidelity.main()
    assert "bits.npy: expected float activations, found dtype uint16" in capsys.readouterr().err


def test_a_stopped_run_says_so_in_one_line_and_its_rerun_resumes(tmp_path, capsys, monkeypatch):
    """SIGTERM or Ctrl-C in a long benchmark run: one line and exit 75 (it was a traceback), and the
    same command resumes the run, its row saying from which step (its seconds count that part only)."""
    from jumprelu.train import preemption

    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(3000, 8)).astype(np.float32))
    out = tmp_path / "out"
    argv = ["fidelity.py", str(tmp_path / "x.npy"), "--out", str(out), "--eval_rows", "500", "--kinds", "topk"]
    argv += ["--targets", "4", "--tokens", "2048", "--width", "32", "--batch", "64"]
    monkeypatch.setattr("sys.argv", argv)
    requested = preemption.Watch.requested

    def sigterm_after_step_2(watch, step, sync_step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # to the loop's own handler
        return requested(watch, step, sync_step)

    with monkeypatch.context() as m:
        m.setattr(preemption.Watch, "requested", sigterm_after_step_2)
        with pytest.raises(SystemExit) as stop:
            fidelity.main()
    assert stop.value.code == 75
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fidelity: topk at L0 4: stopped by SIGTERM at step 3: saved "), err
    fidelity.main()
    row = [json.loads(line) for line in open(out / "results.jsonl")]
    assert len(row) == 1 and row[0]["resumed_at_step"] == 3
