"""The least-squares decoder refit (`jumprelu/train/refit.py`, `jumprelu refit`): the ridge
solution by hand, chunking, latents that never fire, and the command on a trained run."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import jumprelu
from jumprelu.core.folded import SAE
from jumprelu.train import refit as refit_lib
from jumprelu.train.loop import train

D, M = 8, 16


def _sae(k=None):
    rng = np.random.default_rng(0)
    threshold = np.full(M, 0.3, np.float32)
    threshold[:3] = 1e6  # these latents never fire
    arrays = dict(W_enc=rng.normal(size=(D, M)), b_enc=rng.normal(size=M) * 0.1, threshold=threshold,
                  W_dec=rng.normal(size=(M, D)), b_dec=rng.normal(size=D))  # fmt: skip
    return SAE(**{name: jnp.asarray(a, jnp.float32) for name, a in arrays.items()}, k=k)


def _rows(n=300):
    return np.random.default_rng(1).normal(size=(n, D)).astype(np.float32)


def test_refit_is_the_ridge_least_squares_decoder_and_keeps_the_encoder():
    sae, x, ridge = _sae(), _rows(), 0.05
    refit, used = refit_lib.refit_decoder(sae, [x[:100], x[100:250], x[250:]], ridge)
    assert used == len(x)
    f = np.asarray(sae.encode(x), np.float64)
    fired = f.any(axis=0)
    assert not fired[:3].any() and fired[3:].all()
    a = np.concatenate([f[:, fired], np.ones((len(x), 1))], axis=1)
    g = a.T @ a
    g[np.arange(fired.sum()), np.arange(fired.sum())] += ridge * np.mean(np.diag(g)[:-1])
    want = np.linalg.solve(g, a.T @ x)
    # the least-squares decoder, each fitted row at unit norm and its latent's code scaled by the norm
    norms = np.linalg.norm(want[:-1], axis=1)
    np.testing.assert_allclose(np.asarray(refit.W_dec)[fired], want[:-1] / norms[:, None], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(refit.W_dec)[fired], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(refit.b_dec, want[-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(refit.W_dec[~fired], sae.W_dec[~fired])  # never fired: left as trained
    f_refit = np.asarray(refit.encode(x), np.float64)
    np.testing.assert_array_equal(f_refit != 0, f != 0)  # the same latents fire on the same rows
    np.testing.assert_allclose(f_refit[:, fired], f[:, fired] * norms, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(refit(x)), f[:, fired] @ want[:-1] + want[-1], rtol=1e-4, atol=1e-4)
    for name in ("W_enc", "b_enc", "threshold"):  # latents that never fired keep theirs
        np.testing.assert_array_equal(
            np.asarray(getattr(refit, name))[..., ~fired], np.asarray(getattr(sae, name))[..., ~fired]
        )


def test_refit_lowers_the_error_on_its_rows():
    sae, x = _sae(), _rows()
    refit, _ = refit_lib.refit_decoder(sae, [x], 1e-6)
    before = np.mean(np.sum((np.asarray(sae(x)) - x) ** 2, axis=1))
    after = np.mean(np.sum((np.asarray(refit(x)) - x) ** 2, axis=1))
    assert after < 0.5 * before


@pytest.mark.parametrize(
    "sae, ridge, width_cap, message",
    [
        (_sae(k=4), 0.01, None, "TopK"),
        (_sae(), 0.0, None, "ridge must be finite and > 0"),
        (_sae(), float("inf"), None, r"ridge must be finite and > 0 .*, found inf"),
        (_sae(), 0.01, M - 1, "width 16 > 15"),
    ],
)
def test_refit_refuses_what_it_cannot_fit(monkeypatch, sae, ridge, width_cap, message):
    if width_cap is not None:
        monkeypatch.setattr(refit_lib, "MAX_WIDTH", width_cap)
    with pytest.raises(ValueError, match=message):
        refit_lib.refit_decoder(sae, [_rows()], ridge)


def test_refit_command_on_a_trained_run(tmp_path, tiny_config):
    run = tmp_path / "run"
    train(tiny_config, str(run))
    cmd = [sys.executable, "-m", "jumprelu", "refit", "--workdir", str(run), "--rows", "2048"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((run / "refit" / "refit.json").read_text())
    seen = tiny_config.train.steps * tiny_config.train.batch_size
    assert report["rows"] == 2048 and report["stream_rows"] == [seen - 2048, seen]
    assert report["after"]["l0"] == report["before"]["l0"]  # the encoder is unchanged
    trained, refit = jumprelu.load(str(run)), jumprelu.load(str(run / "refit" / "params.npz"))
    x = np.random.default_rng(2).normal(size=(64, trained.d_model)).astype(np.float32) * trained.scale
    np.testing.assert_array_equal(np.asarray(refit.encode(x)) != 0, np.asarray(trained.encode(x)) != 0)
    np.testing.assert_allclose(np.linalg.norm(refit.W_dec, axis=1), 1.0, rtol=1e-5)  # as SAEBench checks
    assert not np.array_equal(refit.W_dec, trained.W_dec)
    bad = subprocess.run(cmd[:-1] + ["0"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--rows must be > 0" in bad.stderr


def test_an_interrupted_refit_leaves_no_other_steps_provenance(tmp_path, tiny_config, monkeypatch):
    """A refit killed after writing params.npz must not leave the previous refit's run file (its
    step, config) or report beside the new parameters."""
    from jumprelu.cli.refit import refit_workdir
    from jumprelu.export import gemma_scope

    run = tmp_path / "run"
    train(tiny_config, str(run))
    refit_workdir(str(run), None, 1024, 0.01)
    assert (run / "refit" / "refit.json").exists() and (run / "refit" / "params.run.json").exists()
    real_export = gemma_scope.export

    def export_then_die(sae, path):
        real_export(sae, path)
        raise KeyboardInterrupt  # the kill lands between params.npz and its run file

    monkeypatch.setattr(gemma_scope, "export", export_then_die)
    with pytest.raises(KeyboardInterrupt):
        refit_workdir(str(run), None, 512, 0.01)
    assert sorted(p.name for p in (run / "refit").iterdir()) == ["params.npz"]
    assert jumprelu.load(str(run / "refit" / "params.npz")).W_dec.shape[0] == tiny_config.sae.width


def test_evaluate_and_refit_follow_a_store_that_moved(tmp_path, tiny_config):
    """An audit: after the store moved, `evaluate` failed with "no such directory" and had no way to
    be told where it went. `--store` names it (the rows are checked to be the run's), and without it
    the error says so."""
    from jumprelu.cli.evaluate import evaluate_workdir
    from jumprelu.cli.refit import refit_workdir
    from jumprelu.errors import DataError
    from jumprelu.store import StoreWriter

    rows = np.random.default_rng(0).standard_normal((3000, 32)).astype(np.float32)
    for name, scale in (("st", 1), ("other", 2)):
        w = StoreWriter(str(tmp_path / name), d_model=32)
        w.append(rows * scale)
        w.close()
    tiny_config.data.source, tiny_config.train.steps = str(tmp_path / "st"), 20
    train(tiny_config, str(tmp_path / "run"))
    before = evaluate_workdir(str(tmp_path / "run"))[1]["stored"]
    (tmp_path / "st").rename(tmp_path / "moved")
    with pytest.raises(DataError, match=r"the run's store .*st is gone .*jumprelu evaluate --store PATH$"):
        evaluate_workdir(str(tmp_path / "run"))
    after = evaluate_workdir(str(tmp_path / "run"), store=str(tmp_path / "moved"))[1]["stored"]
    assert after["fvu"] == before["fvu"] and after["l0"] == before["l0"]
    assert "after" in refit_workdir(str(tmp_path / "run"), None, 512, 0.01, store=str(tmp_path / "moved"))
    with pytest.raises(DataError, match="holds other rows than the run trained on"):
        evaluate_workdir(str(tmp_path / "run"), store=str(tmp_path / "other"))


NESTED = ((4, 1.0), (8, 1.0), (16, 2.0))  # a Matryoshka SAE's (prefix width, weight) pairs


def _nested_error(sae, x, nested=NESTED):
    """Σ_p w_p ‖x − f[:, :m_p] W_dec[:m_p] − b_dec‖² summed over rows, in float64, and its gradient
    with respect to (W_dec, b_dec), by hand."""
    f = np.asarray(sae.encode(x), np.float64)
    w_dec, b_dec = np.asarray(sae.W_dec, np.float64), np.asarray(sae.b_dec, np.float64)
    total, grad_w, grad_b = 0.0, np.zeros_like(w_dec), np.zeros_like(b_dec)
    for m, weight in nested:
        r = x - f[:, :m] @ w_dec[:m] - b_dec
        total += weight * np.sum(r**2)
        grad_w[:m] -= 2 * weight * f[:, :m].T @ r
        grad_b -= 2 * weight * r.sum(axis=0)
    return total, grad_w, grad_b


def test_prefix_weights_by_hand():
    np.testing.assert_array_equal(refit_lib.prefix_weights(16, NESTED), [4.0] * 4 + [3.0] * 4 + [2.0] * 8 + [4.0])
    np.testing.assert_array_equal(refit_lib.prefix_weights(16, ()), np.ones(17))


def test_a_matryoshka_refit_minimises_its_weighted_nested_error(monkeypatch):
    """The refit of a Matryoshka SAE is the least-squares decoder of the loss it trained with (the
    weighted sum over its prefixes), not of the whole width's error alone."""
    sae, x = _sae(), _rows().astype(np.float64)
    nested, _ = refit_lib.refit_decoder(sae, [x], 1e-9, NESTED)
    plain, _ = refit_lib.refit_decoder(sae, [x], 1e-9)
    at_nested, grad_w, grad_b = _nested_error(nested, x)
    _, grad_w0, grad_b0 = _nested_error(sae, x)
    # stationary: the gradient of the nested error vanishes there (against its size at the trained SAE)
    assert np.abs(grad_w).max() < 1e-4 * np.abs(grad_w0).max() and np.abs(grad_b).max() < 1e-4 * np.abs(grad_b0).max()
    assert at_nested < _nested_error(plain, x)[0]  # the plain refit is worse on the loss trained
    whole = ((16, 1.0),)
    assert _nested_error(plain, x, whole)[0] <= _nested_error(nested, x, whole)[0]  # ...and best on the whole
    # one prefix (the whole width) is the plain refit, and the Gram matrix weighted in pieces is the same
    one, _ = refit_lib.refit_decoder(sae, [x], 0.05, ((16, 3.0),))
    two, _ = refit_lib.refit_decoder(sae, [x], 0.05)
    np.testing.assert_allclose(one.W_dec, two.W_dec, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(refit_lib, "_WEIGHT_ROWS", 5)
    pieces, _ = refit_lib.refit_decoder(sae, [x], 1e-9, NESTED)
    np.testing.assert_allclose(pieces.W_dec, nested.W_dec, rtol=1e-6, atol=1e-6)


def test_the_refit_command_fits_a_matryoshka_run_to_its_prefixes(tmp_path, tiny_config):
    from jumprelu.cli.refit import refit_workdir

    tiny_config.sae.update(matryoshka_widths=(16, 64), matryoshka_weights=(1.0, 3.0))
    run = tmp_path / "run"
    train(tiny_config, str(run))
    nested = refit_workdir(str(run), None, 2048, 0.01)
    for when in ("before", "after"):  # refit.json reports the prefix's held-out L0 and FVU too
        (cut,) = nested[when]["prefixes"]
        assert cut["width"] == 16 and 0 < cut["fvu"] < 1 and 0 < cut["l0"] < nested[when]["l0"]
    # --noprefixes: the whole width's error alone (the command before)
    cmd = [sys.executable, "-m", "jumprelu", "refit", "--workdir", str(run), "--rows", "2048", "--noprefixes"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    plain = json.loads((run / "refit" / "refit.json").read_text())
    assert nested["nested"] and not plain["nested"]
    assert nested["after"]["prefixes"][0]["fvu"] < plain["after"]["prefixes"][0]["fvu"]
    assert nested["after"]["l0"] == plain["after"]["l0"] == nested["before"]["l0"]
