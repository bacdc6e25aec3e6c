"""Initialisation, encode/decode, and the fold into raw activation units."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jumprelu.core import ops
from jumprelu.core.folded import fold
from jumprelu.core.kinds.jumprelu import JumpReLUSAE
from jumprelu.core.kinds.jumprelu_loss import threshold_of
from jumprelu.core.sae import constrain


def _init(**kw):
    model = JumpReLUSAE(d_model=12, width=40, **kw)
    return model, model.init(jax.random.key(0), jnp.zeros((1, 12)))["params"]


def test_paper_initialisation():
    _, p = _init()
    np.testing.assert_allclose(np.linalg.norm(p["W_dec"], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(p["W_enc"], p["W_dec"].T)
    assert not np.any(p["b_enc"]) and not np.any(p["b_dec"])
    np.testing.assert_allclose(threshold_of(p), 0.001, rtol=1e-6)
    assert set(p) == {"W_enc", "b_enc", "log_threshold", "W_dec", "b_dec"}


def test_raw_threshold_option_and_float32_threshold_under_bf16():
    _, p = _init(threshold_param="raw", compute_dtype=jnp.bfloat16)
    assert "threshold" in p and "log_threshold" not in p
    assert p["threshold"].dtype == jnp.float32
    np.testing.assert_allclose(p["threshold"], 0.001)
    with pytest.raises(ValueError, match="threshold_param"):
        _init(threshold_param="softplus")


def test_encode_decode_match_the_formulas():
    model, p = _init()
    rng = np.random.default_rng(0)
    p = {k: jnp.asarray(rng.standard_normal(v.shape).astype(np.float32) * 0.3) for k, v in p.items()}
    x = rng.standard_normal((5, 12)).astype(np.float32)
    theta = np.exp(np.asarray(p["log_threshold"]))
    z = (x - np.asarray(p["b_dec"])) @ np.asarray(p["W_enc"]) + np.asarray(p["b_enc"])
    f = np.where(z > theta, z, 0.0)
    out = model.apply({"params": p}, x)
    np.testing.assert_allclose(out["f"], f, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["x_hat"], f @ np.asarray(p["W_dec"]) + np.asarray(p["b_dec"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["l0"], (z > theta).sum(-1))
    np.testing.assert_array_equal(out["fired_per_latent"], (z > theta).sum(0))


@pytest.mark.parametrize("pre_encoder_bias", [True, False])
def test_folded_and_unfolded_forms_agree(pre_encoder_bias):
    model, p = _init(pre_encoder_bias=pre_encoder_bias)
    rng = np.random.default_rng(1)
    p = {k: jnp.asarray(rng.standard_normal(v.shape).astype(np.float32) * 0.2) for k, v in p.items()}
    c = 7.5
    x_raw = rng.standard_normal((64, 12)).astype(np.float32) * c
    out = model.apply({"params": p}, x_raw / c)
    fp = fold(p, c, pre_encoder_bias)
    z_raw = x_raw @ fp["W_enc"] + fp["b_enc"]
    f_raw = ops.jumprelu(z_raw, fp["threshold"], 1.0)
    x_hat_raw = f_raw @ fp["W_dec"] + fp["b_dec"]
    np.testing.assert_allclose(f_raw, c * out["f"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(x_hat_raw, c * out["x_hat"], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(f_raw) > 0, np.asarray(out["f"]) > 0)


def test_constrain_normalises_rows_and_keeps_raw_threshold_positive():
    p = {"W_dec": jnp.array([[3.0, 4.0], [0.0, 2.0]]), "threshold": jnp.array([-1.0, 0.5])}
    q = constrain(p)
    np.testing.assert_allclose(q["W_dec"], [[0.6, 0.8], [0.0, 1.0]])
    assert q["threshold"][0] > 0 and q["threshold"][1] == 0.5


@pytest.mark.parametrize("k", [None, 3])
def test_a_nan_input_row_gives_nan_not_an_empty_code(k):
    """An audit: a row holding NaN encoded to all zeros (`NaN > θ` is False), so the loaded SAE
    reported L0 0 and returned b_dec for it; other rows are unaffected."""
    from jumprelu.core.folded import SAE

    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 40)).astype(np.float32)
    sae = SAE(w, np.zeros(40, np.float32), np.full(40, 0.1, np.float32), w.T.copy(), np.zeros(12, np.float32), k=k)
    x = rng.standard_normal((3, 12)).astype(np.float32)
    bad = x.copy()
    bad[1, 4] = np.nan
    f, f_bad = np.asarray(sae.encode(x)), np.asarray(sae.encode(bad))
    assert np.isnan(f_bad[1]).all() and np.isnan(np.asarray(sae(bad))[1]).all()
    np.testing.assert_array_equal(f_bad[[0, 2]], f[[0, 2]])
    assert not np.isnan(f).any() and (f == 0).any()  # inactive latents are still exactly 0
    # what reads the codes does not count the NaN row as firing every latent, nor rank it first
    from jumprelu.evaluate.metrics import evaluate_rows
    from jumprelu.export.neuronpedia import feature_stats

    params = dict(sae.params(), k=k)
    clean = evaluate_rows(params, x[[0, 2]])
    assert evaluate_rows(params, bad)["l0"] * 3 == pytest.approx(clean["l0"] * 2)
    stats = feature_stats(sae, bad, top=3)
    assert np.isfinite(stats["max_activation"]).all() and 1 not in stats["top_rows"]
    np.testing.assert_array_equal(stats["max_activation"], feature_stats(sae, x[[0, 2]], top=3)["max_activation"])


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(threshold_init=0.0), "JumpReLUSAE: threshold_init must be > 0, found 0.0"),
        (dict(threshold_init=-0.1, threshold_param="raw"), "JumpReLUSAE: threshold_init must be > 0, found -0.1"),
        (dict(width=0), "JumpReLUSAE: width must be a positive integer, found 0"),
        (dict(d_model=2.5), "JumpReLUSAE: d_model must be a positive integer, found 2.5"),
    ],
)
def test_the_module_used_on_its_own_names_a_bad_field(kw, message):
    """An audit: used directly with flax (as the README shows), threshold_init 0 was "math domain
    error" and width 0 a ZeroDivisionError; the config checks these for training runs."""
    args = {"d_model": 12, "width": 40, **kw}
    with pytest.raises(ValueError, match=re.escape(message)):
        JumpReLUSAE(**args).init(jax.random.key(0), jnp.zeros((1, 12)))
    JumpReLUSAE(d_model=np.int64(12), width=np.int64(40)).init(jax.random.key(0), jnp.zeros((1, 12)))
