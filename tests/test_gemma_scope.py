"""Gemma Scope params.npz interop: export, load, the released layout's computation, clear errors."""

import subprocess
import sys

import numpy as np
import pytest

import jumprelu
from jumprelu.export import gemma_scope
from jumprelu.train.loop import train
from tests.test_train import ROOT


def _released_layout(rng, d=16, m=48):
    return {
        "W_enc": rng.normal(size=(d, m)).astype(np.float32),
        "W_dec": rng.normal(size=(m, d)).astype(np.float32),
        "b_enc": rng.normal(size=m).astype(np.float32) * 0.1,
        "b_dec": rng.normal(size=d).astype(np.float32),
        "threshold": np.abs(rng.normal(size=m)).astype(np.float32),
    }


def test_hand_made_npz_computes_the_released_formula(tmp_path):
    rng = np.random.default_rng(0)
    p = _released_layout(rng)
    path = str(tmp_path / "params.npz")
    np.savez(path, **p)
    sae = jumprelu.load(path)
    x = rng.normal(size=(32, 16)).astype(np.float32) * 3
    pre = x @ p["W_enc"] + p["b_enc"]
    mask = pre > p["threshold"]
    f = mask * pre
    np.testing.assert_allclose(np.asarray(sae.encode(x)), f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sae(x)), f @ p["W_dec"] + p["b_dec"], rtol=1e-4, atol=1e-4)
    assert 0 < mask.mean() < 1  # the threshold really cuts


def test_export_then_load_reproduces_encode_and_decode_exactly(tmp_path, tiny_config):
    train(tiny_config, str(tmp_path / "run"))
    ours = jumprelu.load(str(tmp_path / "run"))
    out = str(tmp_path / "exported" / "params.npz")
    (tmp_path / "exported").mkdir()
    cli = subprocess.run(
        [sys.executable, "-m", "jumprelu", "export", str(tmp_path / "run"), out],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stderr
    theirs = jumprelu.load(out)
    x = np.random.default_rng(1).normal(size=(64, ours.d_model)).astype(np.float32) * ours.scale
    np.testing.assert_array_equal(np.asarray(theirs.encode(x)), np.asarray(ours.encode(x)))
    np.testing.assert_array_equal(np.asarray(theirs(x)), np.asarray(ours(x)))
    with np.load(out, allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(gemma_scope.KEYS)
        assert all(npz[k].dtype == np.float32 for k in npz.files)


def test_bad_files_give_one_line_errors(tmp_path):
    rng = np.random.default_rng(0)
    p = _released_layout(rng)
    missing = dict(p)
    del missing["threshold"]
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(gemma_scope.GemmaScopeError, match=r"missing keys \['threshold'\]") as e:
        jumprelu.load(str(tmp_path / "missing.npz"))
    assert "\n" not in str(e.value) and "missing.npz" in str(e.value)
    wrong = dict(p, b_dec=np.zeros(17, np.float32))
    np.savez(tmp_path / "wrong.npz", **wrong)
    with pytest.raises(gemma_scope.GemmaScopeError, match=r"b_dec has shape \[17\], expected \[16\]"):
        jumprelu.load(str(tmp_path / "wrong.npz"))
    pickled = dict(p, W_enc=np.array([object()], dtype=object))
    np.savez(tmp_path / "pickled.npz", **pickled)
    with pytest.raises(gemma_scope.GemmaScopeError, match="without pickle"):
        jumprelu.load(str(tmp_path / "pickled.npz"))
    with pytest.raises(gemma_scope.GemmaScopeError, match="no such file"):
        jumprelu.load(str(tmp_path / "absent.npz"))
    (tmp_path / "text.npz").write_text("not an archive")  # NumPy would call it pickled data
    with pytest.raises(gemma_scope.GemmaScopeError, match=r"text.npz: not an .npz file \(it is not a zip archive\)$"):
        jumprelu.load(str(tmp_path / "text.npz"))
    (tmp_path / "notes.txt").write_text("x")  # neither a released layout nor a workdir
    with pytest.raises(ValueError, match="a file, but not a released SAE .* a training workdir is a directory"):
        jumprelu.load(str(tmp_path / "notes.txt"))
    np.savez(tmp_path / "whole.npz", **p)  # a download cut short
    (tmp_path / "cut.npz").write_bytes((tmp_path / "whole.npz").read_bytes()[:1000])
    with pytest.raises(gemma_scope.GemmaScopeError, match="cut.npz: not a readable .npz") as e:
        jumprelu.load(tmp_path / "cut.npz")  # a pathlib.Path loads like a str
    assert "\n" not in str(e.value)
    assert jumprelu.load(tmp_path / "whole.npz").width == p["W_enc"].shape[1]


def test_topk_sae_is_not_exported(tmp_path, tiny_config):
    tiny_config.sae.update(kind="topk", k=4)
    tiny_config.train.steps = 4
    train(tiny_config, str(tmp_path / "run"))
    with pytest.raises(gemma_scope.GemmaScopeError, match="TopK"):
        gemma_scope.export(jumprelu.load(str(tmp_path / "run")), str(tmp_path / "p.npz"))
