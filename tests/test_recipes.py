"""Recipe options of the JumpReLU kind: each sparsity term against a hand computation (values and
θ/z gradients), the data-dependent init, Matryoshka's nested reconstructions, the schedules, and
every option through the real loop, sharded on 8 simulated devices and stacked."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jumprelu
from jumprelu.config import ConfigError, validate
from jumprelu.core import init as init_lib
from jumprelu.core import losses, sparsity
from jumprelu.core.kinds import jumprelu as jumprelu_kind
from jumprelu.errors import UserError
from jumprelu.evaluate import metrics
from jumprelu.evaluate.metrics import evaluate_rows
from jumprelu.launch import experiment
from jumprelu.train import optim
from jumprelu.train.loop import train
from tests.test_train import read_jsonl

Z = jnp.array([[0.5, 1.2], [1.05, 0.2]])
THETA = jnp.array([1.0, 1.0])
EPS = 0.2  # window |z - θ| < 0.1: only z[1, 0] = 1.05 is inside it
IN_WINDOW = np.array([[0.0, 0.0], [1.0, 0.0]])
B = 2


def _grads(fn):
    return jax.grad(fn, argnums=(0, 1))(Z, THETA)


def test_step_loss_value_and_gradients():
    fn = lambda z, t: sparsity.step_loss(sparsity.l0_per_row(z, t, EPS), 0.5)  # noqa: E731
    assert float(fn(Z, THETA)) == pytest.approx(0.5 * 1.0)  # L0 rows [1, 1]
    gz, gt = _grads(fn)
    np.testing.assert_allclose(gz, 0.0)  # the L0 term trains θ only
    np.testing.assert_allclose(gt, 0.5 / B * (-1 / EPS) * IN_WINDOW.sum(0), rtol=1e-6)


def test_quadratic_loss_value_and_gradients():
    lam, target = 0.5, 3.0
    fn = lambda z, t: sparsity.quadratic_loss(sparsity.l0_per_row(z, t, EPS), lam, target)  # noqa: E731
    assert float(fn(Z, THETA)) == pytest.approx(lam * (2 / target) * (1.0 - target) ** 2)
    gz, gt = _grads(fn)
    np.testing.assert_allclose(gz, 0.0)
    slope = lam * (2 / target) * 2 * (1.0 - target)  # d/d(mean L0)
    np.testing.assert_allclose(gt, slope / B * (-1 / EPS) * IN_WINDOW.sum(0), rtol=1e-6)


def test_quadratic_rows_loss_value_and_gradients():
    """Per row: the rows' L0 are [1, 1] in Z, so each row's slope (2/T)·2·(L0_b - T) sends
    its own window entries' θ-gradient; a row at the target would send none."""
    lam, target = 0.5, 3.0
    fn = lambda z, t: sparsity.quadratic_rows_loss(sparsity.l0_per_row(z, t, EPS), lam, target)  # noqa: E731
    l0_rows = np.array([1.0, 1.0])
    assert float(fn(Z, THETA)) == pytest.approx(lam * (2 / target) * np.mean((l0_rows - target) ** 2))
    gz, gt = _grads(fn)
    np.testing.assert_allclose(gz, 0.0)
    slope = lam * (2 / target) * 2 * (l0_rows - target) / B  # d/d L0_b
    np.testing.assert_allclose(gt, (slope[:, None] * (-1 / EPS) * IN_WINDOW).sum(0), rtol=1e-6)
    fn_at = lambda z, t: sparsity.quadratic_rows_loss(sparsity.l0_per_row(z, t, EPS), lam, 1.0)  # noqa: E731
    np.testing.assert_allclose(jax.grad(fn_at, argnums=1)(Z, THETA), 0.0)  # both rows at T: no pull
    # Rows with different L0 [2, 1] (z[0, 0] = 1.5 now fires, outside the window): the per-row
    # loss differs from the quadratic of the mean, and θ_0's gradient is row 1's slope alone.
    z2 = Z.at[0, 0].set(1.5)
    assert float(fn(z2, THETA)) == pytest.approx(lam * (2 / target) * ((2 - target) ** 2 + (1 - target) ** 2) / 2)
    assert float(fn(z2, THETA)) != pytest.approx(float(sparsity.quadratic_loss(jnp.array([2.0, 1.0]), lam, target)))
    g_theta0 = float(jax.grad(fn, argnums=1)(z2, THETA)[0])
    assert g_theta0 == pytest.approx(lam * (2 / target) * 2 * (1 - target) / B * (-1 / EPS), rel=1e-6)


def test_tanh_loss_value_and_gradients():
    lam, c, norms = 0.5, 0.5, jnp.array([1.0, 2.0])  # c·f·‖W_dec‖ ~ 1: tanh far from saturation
    fn = lambda z, t: sparsity.tanh_loss(jumprelu.jumprelu(z, t, EPS), norms, lam, c)  # noqa: E731
    f = np.where(np.asarray(Z) > 1.0, np.asarray(Z), 0.0)
    want = lam * np.mean(np.sum(np.tanh(c * f * np.asarray(norms)), axis=-1))
    assert float(fn(Z, THETA)) == pytest.approx(want, rel=1e-6)
    gz, gt = _grads(fn)
    sech2 = 1 - np.tanh(c * f * np.asarray(norms)) ** 2
    dloss_df = lam / B * c * np.asarray(norms) * sech2
    np.testing.assert_allclose(gz, np.where(f > 0, dloss_df, 0.0), rtol=1e-5)
    # θ through JumpReLU's pseudo-derivative -(θ/ε) K: only z[1, 0] is in the window
    np.testing.assert_allclose(gt, (dloss_df * (-1.0 / EPS) * IN_WINDOW).sum(0), rtol=1e-5)


def test_frequency_penalty_value_and_gradients():
    fn = lambda z, t: sparsity.frequency_penalty(z, t, EPS, coefficient=2.0, limit=0.1)  # noqa: E731
    assert float(fn(Z, THETA)) == pytest.approx(2.0 * 2 * (0.5 - 0.1))  # both latents fire on half
    gz, gt = _grads(fn)
    np.testing.assert_allclose(gz, 0.0)
    np.testing.assert_allclose(gt, 2.0 / B * (-1 / EPS) * IN_WINDOW.sum(0), rtol=1e-6)


def test_frequency_penalty_spares_the_most_frequent_latents():
    # counts over 10 rows: shares 0.5, 0.3, 0.1, 0.0, 0.4 against the limit 0.1; the first 2 by
    # count (latents 0 and 4) are spared, so only latent 1's excess 0.2 is penalised
    counts = jnp.array([5.0, 3.0, 1.0, 0.0, 4.0])
    fn = lambda c, spared: sparsity.frequency_penalty_of_counts(c, 10, 2.0, 0.1, spared)  # noqa: E731
    assert float(fn(counts, 0)) == pytest.approx(2.0 * (0.4 + 0.2 + 0.3))
    assert float(fn(counts, 2)) == pytest.approx(2.0 * 0.2)
    np.testing.assert_allclose(jax.grad(fn)(counts, 2), [0.0, 0.2, 0.0, 0.0, 0.0])  # μ / rows where penalised
    # through z and θ: with the most frequent of the two latents spared, latent 0 (in the window) is not
    # penalised either, since both fire on half the batch and ties go to the lower index
    spare_one = lambda z, t: sparsity.frequency_penalty(z, t, EPS, 2.0, 0.1, spared=1)  # noqa: E731
    assert float(spare_one(Z, THETA)) == pytest.approx(2.0 * (0.5 - 0.1))
    np.testing.assert_allclose(jax.grad(spare_one, argnums=1)(Z, THETA), 0.0)  # spared: no pull on θ_0


def test_frequency_allowance_is_a_share_of_the_width(tiny_config):
    tiny_config.sae.update(frequency_penalty=0.01, frequency_allowance=0.05)  # width 64
    assert jumprelu_kind.Recipe.from_config(tiny_config.sae).frequency_spared == 3
    tiny_config.sae.frequency_allowance = 0.01  # 0.64 latents: at least one is spared
    assert jumprelu_kind.Recipe.from_config(tiny_config.sae).frequency_spared == 1
    tiny_config.sae.frequency_allowance = 1.0
    with pytest.raises(ConfigError, match=r"sae.frequency_allowance must be in \[0, 1\), found 1.0"):
        validate(tiny_config)
    tiny_config.sae.update(frequency_allowance=0.05, frequency_penalty=0.0)
    with pytest.raises(ConfigError, match=r"sae.frequency_allowance must be 0 unless sae.frequency_penalty > 0"):
        validate(tiny_config)
    tiny_config.sae.update(frequency_penalty=0.01, width=100, frequency_allowance=0.29)
    assert jumprelu_kind.Recipe.from_config(tiny_config.sae).frequency_spared == 29


def test_pre_act_loss_pulls_only_dead_latents_up():
    dead, norms = jnp.array([False, True]), jnp.array([1.0, 2.0])
    fn = lambda z, t: sparsity.pre_act_loss(z, t, dead, norms, coefficient=1.0)  # noqa: E731
    assert float(fn(Z, THETA)) == pytest.approx((0.0 + 0.8 * 2.0) / B)  # latent 1: relu(1 - 1.2), relu(1 - 0.2)
    gz, gt = _grads(fn)
    np.testing.assert_allclose(gz, [[0.0, 0.0], [0.0, -2.0 / B]])
    np.testing.assert_allclose(gt, [0.0, 2.0 / B])


def test_decoder_bias_inits():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [50.0, 50.0]])
    np.testing.assert_allclose(init_lib.decoder_bias(x, "mean"), x.mean(0), rtol=1e-6)
    np.testing.assert_array_equal(init_lib.decoder_bias(x, "zeros"), [0.0, 0.0])
    med = init_lib.decoder_bias(x, "median").astype(np.float64)
    cost = lambda m: np.linalg.norm(x - m, axis=1).sum()  # noqa: E731
    assert cost(med) < cost(x.mean(0))  # the outlier does not drag it
    for dx in ([0.01, 0], [-0.01, 0], [0, 0.01], [0, -0.01]):
        assert cost(med) <= cost(med + np.array(dx)) + 1e-9  # a minimum of Σ‖x - m‖


@pytest.mark.parametrize("mode", ["latent_quantile", "global_quantile"])
def test_threshold_inits_give_the_target_l0_on_the_sample(mode):
    z = np.random.default_rng(0).normal(size=(2000, 64)).astype(np.float32)
    theta = init_lib.thresholds(z, mode, target_l0=8.0)
    assert np.mean(np.sum(z > theta, axis=1)) == pytest.approx(8.0, rel=0.02)
    if mode == "latent_quantile":  # every latent fires on T/M of the rows
        np.testing.assert_allclose(np.mean(z > theta, axis=0), 8.0 / 64, atol=1e-3)


def test_init_from_data_sets_b_dec_theta_and_bandwidth_scale(tiny_config):
    s = tiny_config.sae
    s.update(threshold_param="raw", b_dec_init="median", threshold_init_mode="latent_quantile", target_l0=6.0)
    s.bandwidth_mode = "relative"
    kind = jumprelu_kind.build(s, 8)
    params = kind.model.init(jax.random.key(0), jnp.zeros((1, 8)))["params"]
    x = np.random.default_rng(1).normal(size=(512, 8)).astype(np.float32) + 3.0
    new, stats = init_lib.start_from_data(params, kind.init_stats(), x, s)
    np.testing.assert_allclose(new["b_dec"], init_lib.geometric_median(x), rtol=1e-5)
    z = (x - np.asarray(new["b_dec"])) @ np.asarray(params["W_enc"])
    assert np.mean(np.sum(z > np.asarray(new["threshold"]), axis=1)) == pytest.approx(6.0, rel=0.05)
    assert float(stats["z_scale"]) == pytest.approx(np.median(z.std(axis=0)), rel=1e-5)


@pytest.mark.parametrize("mode", ["latent_quantile", "global_quantile"])
def test_init_from_data_in_latent_slices_keeps_the_target(tiny_config, monkeypatch, mode):
    monkeypatch.setattr(init_lib, "SLICE_ENTRIES", 64 * 256)  # 512 rows: 2 slices of 32 latents; global: 256 rows
    s = tiny_config.sae
    s.update(threshold_param="raw", threshold_init_mode=mode, target_l0=6.0)
    kind = jumprelu_kind.build(s, 8)
    params = kind.model.init(jax.random.key(0), jnp.zeros((1, 8)))["params"]
    x = np.random.default_rng(1).normal(size=(512, 8)).astype(np.float32)
    new, _ = init_lib.start_from_data(params, kind.init_stats(), x, s)
    z = x @ np.asarray(params["W_enc"])
    assert np.mean(np.sum(z > np.asarray(new["threshold"]), axis=1)) == pytest.approx(6.0, rel=0.1)
    if mode == "global_quantile":
        assert np.unique(np.asarray(new["threshold"])).size == 1  # one θ for all, across slices


def test_nested_reconstructions_are_the_prefix_decodes():
    rng = np.random.default_rng(0)
    f, w, b = rng.normal(size=(3, 8)), rng.normal(size=(8, 5)), rng.normal(size=5)
    got = losses.nested_reconstructions(jnp.asarray(f), jnp.asarray(w), jnp.asarray(b), (2, 5, 8))
    for m, x_hat in zip((2, 5, 8), got, strict=True):
        np.testing.assert_allclose(x_hat, f[:, :m] @ w[:m] + b, rtol=1e-5)


def test_matryoshka_in_bfloat16_reconstructs_its_whole_sae_as_its_own_decode(tiny_config):
    """Found by an audit: with sae.compute_dtype=bfloat16 the nested products ran in float32, so the
    loss's last prefix was not the SAE's own (bf16) x̂ (1.8e-3 apart) and cost a float32 decode."""
    s = tiny_config.sae
    s.update(width=256, matryoshka_widths=(64, 256), matryoshka_weights=(0.0, 1.0), threshold_init=0.01)
    s.compute_dtype = "bfloat16"
    kind = jumprelu_kind.build(s, 16)
    params = kind.model.init(jax.random.key(0), jnp.zeros((1, 16)))["params"]
    x = jnp.asarray(np.random.default_rng(2).normal(size=(32, 16)), jnp.float32)
    total, _ = kind.loss(kind.model, params, {}, x, 0.0)  # all the weight on the whole SAE, λ = 0
    x_hat = kind.model.apply({"params": params}, x)["x_hat"]
    assert float(total) == pytest.approx(float(jnp.mean(jnp.sum((x - x_hat) ** 2, axis=-1))), rel=1e-6)


@pytest.mark.parametrize("weights", [(), (1.0, 1.0, 2.0), (0.0, 1.0, 3.0)])
def test_matryoshka_loss_is_the_weighted_mean_of_the_prefix_errors(tiny_config, weights):
    s = tiny_config.sae
    s.update(width=8, matryoshka_widths=(2, 4, 8), matryoshka_weights=weights, threshold_init=0.01)
    kind = jumprelu_kind.build(s, 5)
    params = kind.model.init(jax.random.key(0), jnp.zeros((1, 5)))["params"]
    params = dict(params, b_dec=jnp.full((5,), 0.1))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 5)), jnp.float32)
    lam = 0.01
    total, (metrics, _) = kind.loss(kind.model, params, {}, x, lam)
    f = np.asarray(kind.model.apply({"params": params}, x)["f"])
    w, b = np.asarray(params["W_dec"]), np.asarray(params["b_dec"])
    errs = [np.sum((np.asarray(x) - (f[:, :m] @ w[:m] + b)) ** 2, axis=1) for m in (2, 4, 8)]
    shares = np.asarray(weights or (1.0, 1.0, 1.0)) / sum(weights or (1.0, 1.0, 1.0))
    want = np.mean(sum(p * e for p, e in zip(shares, errs, strict=True)) + lam * np.sum(f != 0, axis=1))
    assert float(total) == pytest.approx(want, rel=1e-5)
    assert float(metrics["mse"]) == pytest.approx(np.mean(errs[-1]), rel=1e-5)  # metrics: the full SAE


def test_a_prefix_of_a_folded_sae_reconstructs_with_its_first_latents_alone():
    rng = np.random.default_rng(3)
    p = dict(W_enc=rng.normal(size=(5, 8)), b_enc=rng.normal(size=8), threshold=np.full(8, 0.3))
    p.update(W_dec=rng.normal(size=(8, 5)), b_dec=rng.normal(size=5), k=None)
    x = rng.normal(size=(64, 5))
    z = x @ p["W_enc"] + p["b_enc"]
    f = np.where(z > 0.3, z, 0.0)[:, :3]
    err = np.sum((x - (f @ p["W_dec"][:3] + p["b_dec"])) ** 2)
    m = evaluate_rows(metrics.prefix(p, 3), x.astype(np.float32))
    assert m["l0"] == pytest.approx(np.mean(np.sum(f != 0, axis=1)))
    assert m["fvu"] == pytest.approx(err / np.sum((x - x.mean(0)) ** 2), rel=1e-4)
    with pytest.raises(ValueError, match="TopK"):
        metrics.prefix(dict(p, k=2), 3)


def test_evaluate_reports_each_matryoshka_prefix(tmp_path, tiny_config):
    from jumprelu.cli.evaluate import evaluate_workdir

    tiny_config.sae.update(matryoshka_widths=(8, 32, 64), matryoshka_weights=(1.0, 1.0, 2.0))
    train(tiny_config, str(tmp_path / "run"))
    sae, result, _ = evaluate_workdir(str(tmp_path / "run"))
    prefixes = result["stored"]["prefixes"]
    assert [p["width"] for p in prefixes] == [8, 32]
    # the first 8 latents alone, by hand on the same held-out rows the report used
    rows = np.asarray(jax.device_get(_held_out_rows(tiny_config, str(tmp_path / "run"))), np.float64)
    p = {k: np.asarray(v, np.float64) for k, v in sae.params().items()}
    z = rows @ p["W_enc"][:, :8] + p["b_enc"][:8]
    f = np.where(z > p["threshold"][:8], z, 0.0)
    err = np.sum((rows - (f @ p["W_dec"][:8] + p["b_dec"])) ** 2)
    assert prefixes[0]["fvu"] == pytest.approx(err / np.sum((rows - rows.mean(0)) ** 2), rel=1e-3)
    assert prefixes[0]["l0"] == pytest.approx(np.mean(np.sum(f != 0, axis=1)), rel=1e-3)
    assert prefixes[0]["l0"] <= prefixes[1]["l0"] <= result["stored"]["l0"]


def _held_out_rows(cfg, workdir):
    from jumprelu import data as data_lib

    return data_lib.make_stream(cfg.data, data_lib.open_source(cfg.data, workdir)).eval_set()


def test_schedules_decay_and_fraction_warmup(tiny_config):
    t = tiny_config.train
    t.update(steps=100, lr=1.0, lr_warmup_steps=0, lr_decay_fraction=0.2, sparsity_warmup_fraction=0.5)
    lr = optim.learning_rate_schedule(t)
    assert [float(lr(s)) for s in (0, 80, 90, 100)] == pytest.approx([1.0, 1.0, 0.5, 0.0])
    lam = optim.sparsity_schedule(t, 2.0)
    assert [float(lam(s)) for s in (0, 25, 50, 90)] == pytest.approx([0.0, 1.0, 2.0, 2.0])


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("name", ["threshold", "log_threshold"])
def test_thresholds_can_keep_their_lr_through_the_final_decay(tiny_config, stacked, name):
    """At step 90 of 100 with the decay over the last 20%, the lr is 0.5·lr: θ's Adam step (sign of a
    steady gradient, ±1 with β1 = 0 on the first step) is scaled by lr itself with
    decay_thresholds=False and by 0.5·lr with the default; W_enc by 0.5·lr either way. The state is
    optax.scale_by_learning_rate's, so checkpoints do not depend on the option."""
    t = tiny_config.train
    t.update(steps=100, lr=0.2, lr_warmup_steps=0, lr_decay_fraction=0.2)
    lead = (2,) if stacked else ()
    params = {
        "W_enc": jnp.ones((*lead, 3, 4)),
        "W_dec": jnp.eye(4, 3) + jnp.zeros((*lead, 4, 3)),
        name: jnp.ones((*lead, 4)),
    }
    grads = jax.tree.map(jnp.ones_like, params)
    for keep, theta_step in ((False, -0.1), (True, -0.2)):
        t.decay_thresholds = not keep
        tx = optim.make_optimizer(t)
        state = tx.init(params)
        state = (*state[:-1], optax.ScaleByScheduleState(count=jnp.asarray(90, jnp.int32)))  # lr's step 90
        updates, _ = tx.update(grads, state, params)
        np.testing.assert_allclose(updates[name], theta_step, rtol=1e-4)
        np.testing.assert_allclose(updates["W_enc"], -0.1, rtol=1e-4)
    plain = optax.scale_by_learning_rate(optim.learning_rate_schedule(t)).init(params)
    assert jax.tree.structure(tx.init(params)[-1]) == jax.tree.structure(plain)


@pytest.mark.parametrize("stacked", [False, True])
def test_encoder_weight_decay_shrinks_w_enc_only(tiny_config, stacked):
    """With a zero gradient, the update is -lr · decay · W_enc for W_enc and nothing elsewhere."""
    t = tiny_config.train
    t.update(lr=0.5, lr_warmup_steps=0, encoder_weight_decay=0.2)
    lead = (2,) if stacked else ()
    params = {
        "W_enc": jnp.full((*lead, 3, 4), 2.0),
        "W_dec": jnp.full((*lead, 4, 3), 0.5),
        "b_enc": jnp.ones((*lead, 4)),
    }
    tx = optim.make_optimizer(t)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["W_enc"], -0.5 * 0.2 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(updates["W_dec"], 0.0)
    np.testing.assert_allclose(updates["b_enc"], 0.0)


def test_adam_update_clip_bounds_a_long_silent_parameters_first_step(tiny_config):
    """b_enc[0] gets a gradient only at step 500: with β1 = 0, β2 = 0.999 its Adam direction is
    g / √(0.001 g² / (1 − 0.999^500)) = √(0.393 / 0.001) ≈ 19.8; adam_update_clip=2 makes it 2.
    b_enc[1], whose gradient never changed, moves by lr · 1 either way."""
    t = tiny_config.train
    t.update(lr=0.1, lr_warmup_steps=0)
    params = {"W_dec": jnp.eye(2), "b_enc": jnp.zeros(2)}
    silent, first = (
        {"W_dec": jnp.zeros((2, 2)), "b_enc": jnp.array([0.0, 1.0])},
        {"W_dec": jnp.zeros((2, 2)), "b_enc": jnp.array([1.0, 1.0])},
    )
    for clip, expected in ((0.0, np.sqrt((1 - 0.999**500) / 0.001)), (2.0, 2.0)):
        t.adam_update_clip = clip
        tx = optim.make_optimizer(t)
        state = tx.init(params)
        for _ in range(499):
            _, state = tx.update(silent, state, params)
        updates, _ = tx.update(first, state, params)
        np.testing.assert_allclose(updates["b_enc"], [-0.1 * expected, -0.1], rtol=1e-4)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sae.sparsity_loss", "l1", "sae.sparsity_loss must be one of"),
        ("sae.matryoshka_widths", (16, 8), "sae.matryoshka_widths must be increasing integer prefix sizes"),
        ("sae.matryoshka_weights", (1.0, 2.0), "sae.matryoshka_weights must be empty or 0 weights"),
        ("sae.threshold_init_mode", "latent_quantile", "sae.target_l0 must be set when sae.threshold_init_mode"),
        ("sae.b_dec_init", "mode", "sae.b_dec_init must be one of"),
        ("train.lr_decay_fraction", 1.5, "train.lr_decay_fraction must be in"),
        ("train.encoder_weight_decay", -0.1, "train.encoder_weight_decay must be finite and >= 0"),
        ("train.adam_update_clip", -1.0, "train.adam_update_clip must be >= 0"),
        ("sae.batchtopk_fraction", 1.5, r"sae.batchtopk_fraction must be in \[0, 1\]"),
        ("sae.target_l0_held_out_rows", -1, "sae.target_l0_held_out_rows must be an integer >= 0"),
        # a comparison of a word with a number (a TypeError), and a float slice after the compile, before
        ("sae.matryoshka_widths", ("abc",), r"must be increasing integer prefix sizes .* found \('abc',\)"),
        ("sae.matryoshka_widths", (32.5, 64), r"must be increasing integer prefix sizes .* found \(32.5, 64\)"),
        ("sae.target_l0", 64.0, r"sae.target_l0 must be in \(0, sae.width=64\) or unset"),  # trained to what it could
        ("sae.dead_window_tokens", -5, "sae.dead_window_tokens must be a positive integer"),  # every latent dead
        ("data.scale", 5.0, "data.scale must be unset when data.normalize is False"),
    ],
)
def test_bad_recipe_fields_are_named(tiny_config, field, value, message):
    if field == "data.scale":
        tiny_config.data.normalize = False  # C is then 1: a scale would have been ignored
    section, name = field.split(".")
    tiny_config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        validate(tiny_config)


@pytest.mark.parametrize("weights", [(1.0, 2.0), (1.0, -1.0, 2.0), (0.0, 0.0, 0.0), ("a", "b", "c")])
def test_matryoshka_weights_are_one_per_width_and_not_all_zero(tiny_config, weights):
    tiny_config.sae.update(matryoshka_widths=(16, 32, 64), matryoshka_weights=weights)
    with pytest.raises(ConfigError, match=r"sae.matryoshka_weights must be empty or 3 weights >= 0"):
        validate(tiny_config)


def _all_options(cfg, loss: str):
    cfg.sae.update(
        threshold_param="raw",
        b_dec_init="median",
        bandwidth_mode="relative",
        bandwidth=0.2,
        pre_act_coefficient=1e-3,
        dead_window_tokens=256,
        frequency_penalty=0.1,
        frequency_allowance=0.05,
        sparsity_loss=loss,
        matryoshka_widths=(16, 64),
        matryoshka_weights=(1.0, 3.0),
        ste_pre_activations=True,
    )
    cfg.train.update(
        lr_decay_fraction=0.2,
        sparsity_warmup_fraction=0.25,
        adam_b1=0.9,
        clip_grad_norm=1.0,
        encoder_weight_decay=0.1,
        adam_update_clip=3.0,
    )
    return cfg


@pytest.mark.parametrize("loss", ["step", "quadratic", "quadratic_rows", "tanh"])
def test_every_option_trains_sharded_like_on_one_device(tmp_path, tiny_config, loss):
    cfg = _all_options(tiny_config, loss)
    # the first 10 steps as BatchTopK (its top-k over the whole batch, sharded too), then per-latent θ;
    # the controller corrected by the L0 on 256 of the store's held-out rows
    cfg.sae.update(
        target_l0=6.0,
        threshold_init_mode="latent_quantile",
        batchtopk_fraction=0.5,
        target_l0_held_out_rows=256,
        target_l0_lambda_floor=0.01,
    )
    if loss == "tanh":  # tanh and the straight-through terms to z are refused with the phase: no phase
        cfg.sae.batchtopk_fraction = 0.0
    else:
        cfg.sae.ste_pre_activations = False
    cfg.train.steps = 20
    results = {}
    for shape in [(1, 1), (2, 4)]:
        cfg.mesh.data, cfg.mesh.model = shape
        report = train(cfg, str(tmp_path / f"{shape}"))
        results[shape] = jumprelu.load(str(tmp_path / f"{shape}"))
        assert np.isfinite(report["eval"]["fvu"]) and report["eval"]["l0"] > 0
    for k, v in results[(1, 1)].params().items():
        np.testing.assert_allclose(results[(2, 4)].params()[k], v, rtol=2e-4, atol=2e-5, err_msg=k)


@pytest.mark.parametrize("kind", ["relu", "gated"])
def test_kinds_without_a_sparse_path_still_check_sae_sparse(kind):
    from jumprelu.config import base_config

    c = base_config()
    c.sae.kind = kind
    validate(c)
    c.sae.sparse = "bogus"  # was accepted, and the run silently dense
    with pytest.raises(ConfigError, match=r"sae.sparse must be one of \('auto', 'on', 'off'\), found 'bogus'"):
        validate(c)
    c.sae.sparse = "on"
    with pytest.raises(ConfigError, match=f"sae.sparse must be 'auto' or 'off' .sae.kind '{kind}' has no sparse path"):
        validate(c)


def test_training_further_does_not_go_back_into_the_batchtopk_phase(tmp_path, tiny_config):
    """README: raise train.steps to train further. The phase is a share of train.steps, so a run
    past its hand-over would silently train as BatchTopK again: refused, with the share that keeps it."""
    tiny_config.sae.update(target_l0=5.0, threshold_param="raw", batchtopk_fraction=0.5)
    tiny_config.train.update(steps=20, sparsity_warmup_steps=0)
    tiny_config.ckpt.every_steps = 10
    train(tiny_config, str(tmp_path / "run"))
    tiny_config.train.steps = 60
    with pytest.raises(ConfigError, match="handed over from the BatchTopK phase at step 10, and sae.batchtopk_fraction"
                       "=0.5 of 60 steps would take it back into the phase until step 30; set "
                       "sae.batchtopk_fraction=0.166667 to keep the hand-over at step 10"):  # fmt: skip
        train(tiny_config, str(tmp_path / "run"))
    tiny_config.sae.batchtopk_fraction = 0.166667
    train(tiny_config, str(tmp_path / "run"))
    phase = {
        m["step"]: m["batchtopk_phase"]
        for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")
        if "batchtopk_phase" in m
    }
    assert max(phase) == 60 and {p for s, p in phase.items() if s > 10} == {0.0} and phase[min(phase)] == 1.0
    # found by an audit: with a target the log's λ was the unused warm-up schedule, not the controller's
    logged = [m for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "sparsity_coefficient_adaptive" in m]
    assert logged and all(m["sparsity_coefficient"] == m["sparsity_coefficient_adaptive"] for m in logged)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sparsity_loss", "tanh", "sae.sparsity_loss must be 'step' or a quadratic with a BatchTopK phase"),
        ("ste_pre_activations", True, "sae.ste_pre_activations must be False with a BatchTopK phase"),
    ],
)
def test_options_the_batchtopk_phase_would_ignore_are_refused(tiny_config, field, value, message):
    """Found by an audit: through the phase the tanh penalty was on the phase's f (fired at the
    batch's threshold, no θ in it: λ moved nothing while the controller wound it up 5-fold) and the
    straight-through terms to z were not applied; both trained as if unset for 80% of a recipe run."""
    tiny_config.sae.update(target_l0=5.0, threshold_param="raw", batchtopk_fraction=0.5)
    setattr(tiny_config.sae, field, value)
    with pytest.raises(ConfigError, match=re.escape(message) + r".*set sae.batchtopk_fraction=0"):
        validate(tiny_config)
    tiny_config.sae.batchtopk_fraction = 0.0
    validate(tiny_config)


def test_options_train_stacked(tmp_path, tiny_config):
    cfg = _all_options(tiny_config, "tanh")
    cfg.stack.sparsity_coefficients = (0.003, 0.03)
    cfg.mesh.update(data=2, model=2)
    cfg.train.steps = 20
    report = train(cfg, str(tmp_path / "stacked"))
    l0 = [m["eval"]["l0"] for m in report["members"]]
    assert l0[0] > l0[1] > 0
    for i in range(2):
        sae = jumprelu.load(str(tmp_path / "stacked" / f"sae-{i}"))
        assert all(np.all(np.isfinite(v)) for v in sae.params().values())


def test_the_short_recipe_hands_over_from_batchtopk_only_with_a_target():
    from jumprelu.config import base_config
    from jumprelu.recipes import apply_recipe

    with_target = apply_recipe(base_config(), "short", 20)
    assert with_target.sae.batchtopk_fraction == 0.8 and with_target.sae.target_l0 == 20.0
    assert with_target.sae.target_l0_held_out_rows == 1024
    validate(with_target)
    without = apply_recipe(base_config(), "short")  # λ fixed: no k for a BatchTopK phase, no controller
    validate(without)
    recipe = jumprelu_kind.Recipe.from_config(without.sae, 1000)
    assert recipe.batchtopk_steps == 0 and recipe.held_out_rows == 0 and not init_lib.needs_data(without.sae)
    # ...and a target given later gets the whole recipe (the phase and the held-out rows were dropped)
    without.sae.target_l0 = 50.0
    validate(without)
    recipe = jumprelu_kind.Recipe.from_config(without.sae, 1000)
    assert recipe.batchtopk_steps == 800 and recipe.held_out_rows == 1024 and init_lib.needs_data(without.sae)
    from jumprelu.launch import overrides

    c = overrides.apply(experiment.load("recipe").get_config(None), ["--config.sae.target_l0=50"])
    assert c.sae.batchtopk_fraction == 0.8 and c.sae.target_l0_held_out_rows == 1024 and c.sae.target_l0 == 50


def test_the_controllers_held_out_rows_are_the_stores_held_out_split(tmp_path, tiny_config, caplog):
    """The rows the controller reads are the store's own held-out rows (never trained on; 300 of
    512, spread over them), saved with the state; asking for more than data.eval_rows, or changing
    the count on resume, is a one-line error."""
    from jumprelu import data as data_lib
    from jumprelu.core import kinds
    from jumprelu.train import checkpoint

    tiny_config.sae.update(target_l0=6.0, threshold_param="raw", target_l0_held_out_rows=300)
    tiny_config.train.steps = 20
    report = train(tiny_config, str(tmp_path / "run"))
    assert np.isfinite(report["eval"]["fvu"])
    stream = data_lib.make_stream(tiny_config.data, data_lib.open_source(tiny_config.data, str(tmp_path / "run")))
    every = stream.eval_set()
    held = every[np.linspace(0, len(every) - 1, 300).round().astype(int)] / stream.scale
    stream.close()
    kind = kinds.from_config(tiny_config.sae, 32, 20)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    on_cpu = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), tree)  # noqa: E731
    abstract = on_cpu(jax.eval_shape(kind.model.init, jax.random.key(0), jnp.zeros((1, 32)))["params"])
    ckpt = checkpoint.Checkpointer(str(tmp_path / "run"), keep=2, read_only=True)
    scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=cpu)
    _, _, saved = ckpt.restore_sae(abstract, scale, on_cpu(jax.eval_shape(kind.init_stats)), 20)
    ckpt.close()
    np.testing.assert_allclose(saved["held_out_rows"], held, rtol=1e-6)
    ratios = [m["held_out_l0_ratio"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert all(np.isfinite(ratios)) and len(set(ratios)) > 1
    # the report, `jumprelu evaluate` and `jumprelu refit` measure the other 212 held-out rows
    from jumprelu.cli.evaluate import evaluate_workdir
    from jumprelu.cli.refit import refit_workdir

    assert report["eval"]["tokens"] == 512 - 300
    _, evaluated, _ = evaluate_workdir(str(tmp_path / "run"))
    assert evaluated["stored"]["tokens"] == 212
    np.testing.assert_allclose(evaluated["stored"]["l0"], report["eval"]["l0"], rtol=1e-5)
    # a smaller split is a prefix of the run's: the controller's rows among its first 400 are left out
    _, fewer, _ = evaluate_workdir(str(tmp_path / "run"), eval_rows=400)
    assert fewer["stored"]["tokens"] == 400 - int((np.linspace(0, 511, 300).round() < 400).sum())
    for rows in (1024, 1):  # rows past the split were trained on; one row has no spread for FVU
        with pytest.raises(UserError, match=r"--eval_rows must be between 2 and the run's data.eval_rows \(512\)"):
            evaluate_workdir(str(tmp_path / "run"), eval_rows=rows)
    assert refit_workdir(str(tmp_path / "run"), None, 1024, 0.01)["held_out_rows"] == 212
    tiny_config.train.steps = 40
    tiny_config.sae.target_l0_held_out_rows = 128
    with pytest.raises(ConfigError, match="sae.target_l0_held_out_rows is 128 .* trained with 300: changing it"):
        train(tiny_config, str(tmp_path / "run"))
    tiny_config.sae.target_l0_held_out_rows = 1024
    with pytest.raises(ConfigError, match=r"data.eval_rows must be >= sae.target_l0_held_out_rows \(1024\)"):
        train(tiny_config, str(tmp_path / "other"))
    # an audit: a controller reading all held-out rows but one left the report none (or an FVU of one
    # row, ~1e6, from evaluate and refit), found only at the end
    tiny_config.sae.target_l0_held_out_rows, tiny_config.train.steps = 511, 2
    with caplog.at_level(logging.WARNING, logger="jumprelu"):
        assert train(tiny_config, str(tmp_path / "all"))["eval"] == {}
    assert "the L0 controller reads 511 of the data.eval_rows=512 held-out rows, which leaves the report" in caplog.text
    with pytest.raises(UserError, match=r"all: 1 held-out rows to evaluate on \(FVU needs 2\)"):
        evaluate_workdir(str(tmp_path / "all"))
    assert "before" not in refit_workdir(str(tmp_path / "all"), None, 1024, 0.01)  # no metrics of one row


JUMPRELU_READS, TOPK_READS = "only sae.kind 'jumprelu' reads it", "only sae.kind 'topk' and 'batchtopk' read it"


@pytest.mark.parametrize(
    "kind, fields, readers, hint",
    [
        ("relu", {"target_l0": 5.0}, JUMPRELU_READS, None),
        ("gated", {"sparsity_loss": "tanh"}, JUMPRELU_READS, None),
        ("topk", {"matryoshka_widths": (16, 32, 64)}, JUMPRELU_READS, None),
        ("batchtopk", {"target_l0": 8.0}, JUMPRELU_READS, "(TopK's L0 is sae.k)"),
        # `--config.sae.k=50` on a JumpReLU run would train to whatever L0 λ gives, not 50
        ("jumprelu", {"k": 50}, TOPK_READS, "(JumpReLU's L0 is sae.target_l0)"),
        ("relu", {"aux_k": 64}, TOPK_READS, None),
        ("gated", {"batchtopk_threshold_decay": 0.9}, TOPK_READS, None),
        ("jumprelu", {"aux_coefficient": 0.1}, TOPK_READS, None),
        ("topk", {"sparse_capacity": 4}, JUMPRELU_READS, None),  # an audit: TopK's sparse decoder has none
    ],
)
def test_another_kinds_option_is_refused_not_ignored(tiny_config, kind, fields, readers, hint):
    tiny_config.sae.kind = kind
    tiny_config.sae.update(fields)
    (named,) = fields
    with pytest.raises(ConfigError, match=f"config field sae.{named} is .* {readers}") as e:
        validate(tiny_config)
    assert ("L0 is" in str(e.value)) == (hint is not None) and (hint is None or hint in str(e.value))
    owner = "jumprelu" if readers == JUMPRELU_READS else "topk"
    assert str(e.value).endswith(f"e.g. smollm2_pareto:{kind}, leaves it unset), or set sae.kind={owner!r}")
    # the action is one a flag can take (an audit: "unset it", while `=None` was refused for a float)
    undo = f"unset it (--config.sae.{named}=None)" if named == "target_l0" else "set it back to "
    assert f"; {undo}" in str(e.value)


def test_a_placeholder_field_is_unset_by_none_on_the_command_line():
    """`--config.sae.target_l0=None` (ml_collections read it as a float and refused it)."""
    from jumprelu.config import base_config
    from jumprelu.launch import overrides

    c = base_config()
    c.sae.target_l0 = 50.0
    c = overrides.apply(c, ["--config.sae.target_l0=None", "--config.train.lr=0.01"])
    assert c.sae.target_l0 is None and c.train.lr == 0.01
    with pytest.raises(ConfigError, match=r"^flag --config.sae.nosuch=None: the config has no field sae.nosuch$"):
        overrides.apply(c, ["--config.sae.nosuch=None"])


@pytest.mark.parametrize("field", ["sae.sparse_capacity", "sae.bandwidth", "sae.pre_encoder_bias", "data.normalize"])
def test_none_is_refused_where_the_field_has_no_unset_value(field):
    """Found by an audit: `--config.sae.sparse_capacity=None` was a TypeError traceback from deep in a
    check, and `--config.sae.pre_encoder_bias=None` trained without the pre-encoder bias (None read
    as False) while config.json said null."""
    from jumprelu.config import base_config
    from jumprelu.launch import overrides

    c = overrides.apply(base_config(), [f"--config.{field}=None"])
    section, name = field.split(".")
    default = base_config()[section][name]
    with pytest.raises(
        ConfigError, match=rf"^config field {field} cannot be unset \(None\); its default is {default!r}$"
    ):
        validate(c)
    argv = ["jumprelu train", "--config=x.py", "--config.data.scale=None", "--lm.eval.texts=None", "--workdir=None"]
    assert overrides.take_unsets(argv) == (
        ["jumprelu train", "--config=x.py", "--workdir=None"],
        [("config", "data.scale"), ("lm", "eval.texts")],
    )


def test_a_registered_kind_reads_the_fields_it_declares(tiny_config):
    """A kind registered with its own `k` (as the README's guide to a new kind does) is not told
    that only TopK reads it."""
    from jumprelu.core import kinds

    topk = kinds.spec("topk")
    custom = kinds.KindSpec("custom_topk_test", topk.build, lambda: {"k": 32}, lambda s, check: None)
    kinds.register(custom)
    try:
        tiny_config.sae.update(kind="custom_topk_test", k=50)
        validate(tiny_config)
        tiny_config.sae.aux_k = 64  # ...but not TopK's other fields
        with pytest.raises(ConfigError, match="sae.aux_k is 64 but only sae.kind 'topk' and 'batchtopk' read it"):
            validate(tiny_config)
    finally:
        kinds._REGISTRY.pop("custom_topk_test")


def test_a_sweep_from_a_topk_base_runs_jumprelu_without_the_topk_fields():
    """The reset works both ways: a TopK base's k and aux_k go back to their defaults for the sweep's
    JumpReLU run (and stay for its TopK runs), while a field the sweep itself sets is kept."""
    from types import SimpleNamespace

    from jumprelu.config import base_config

    def get_config(arg=None):
        c = base_config()
        c.sae.update(kind="topk", k=20, aux_k=64)
        return c

    module = SimpleNamespace(
        get_config=get_config,
        get_sweep=lambda arg=None: [{"sae.kind": "jumprelu"}, {"sae.kind": "batchtopk"}, {"sae.k": 40}],
    )
    runs = {r.name: r.config.sae for r in experiment.expand(module, None)}
    assert runs["kind=jumprelu"].k == 32 and runs["kind=jumprelu"].aux_k == 512
    assert runs["kind=batchtopk"].k == 20 and runs["k=40"].k == 40


def test_a_sweep_over_kinds_on_a_recipe_base_runs_each_kind_with_its_defaults():
    """smollm2_pareto's base is the JumpReLU recipe; its TopK/ReLU/Gated runs drop the recipe's
    fields (their names, made from the overrides, are unchanged) and validate."""
    module = experiment.load("smollm2_pareto")
    runs = experiment.expand(module, None)
    by_kind = {}
    for run in runs:
        validate(run.config)
        by_kind.setdefault(run.config.sae.kind, run)
    assert (
        by_kind["jumprelu"].config.sae.target_l0 is not None and by_kind["jumprelu"].config.sae.batchtopk_fraction > 0
    )
    for kind in ("relu", "gated", "topk", "batchtopk"):
        s = by_kind[kind].config.sae
        assert s.target_l0 is None and s.batchtopk_fraction == 0 and s.frequency_penalty == 0, kind
        assert by_kind[kind].name.startswith(f"kind={kind}_"), by_kind[kind].name
        # ...and the recipe's train.* fields too: the run is the one `smollm2_pareto:KIND` gives by that name
        alone = {r.name: r.config.to_dict() for r in experiment.expand(module, kind)}
        assert by_kind[kind].config.to_dict() == alone[by_kind[kind].name], kind
        train = by_kind[kind].config.train
        assert train.sparsity_warmup_steps == 100 and train.lr_decay_fraction == 0 and train.encoder_weight_decay == 0


def test_the_controllers_rows_are_spread_over_the_held_out_split(tiny_config):
    """The on-the-fly LM's held-out rows come in text order: the controller takes rows spread over
    all of them, not the first few; too few held-out rows is a one-line error naming the field."""
    s = tiny_config.sae
    s.update(target_l0=4.0, target_l0_held_out_rows=4)
    kind = jumprelu_kind.build(s, 32)
    params = kind.model.init(jax.random.key(0), jnp.zeros((1, 32)))["params"]
    rows = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 32), np.float32)
    x = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    _, stats = init_lib.start_from_data(params, kind.init_stats(), x, s, held_out=rows)
    np.testing.assert_array_equal(np.asarray(stats["held_out_rows"])[:, 0], [0, 3, 6, 9])
    with pytest.raises(ConfigError, match=r"sae.target_l0_held_out_rows=4 needs as many held-out rows .* found 3"):
        init_lib.start_from_data(params, kind.init_stats(), x, s, held_out=rows[:3])


def test_reports_leave_out_the_controllers_rows_of_any_split_size():
    rows = np.arange(12)[:, None]
    np.testing.assert_array_equal(init_lib.report_rows(rows[:10], 4)[:, 0], [1, 2, 4, 5, 7, 8])
    # read with a larger split (a prefix property of the held-out split): the same rows are left out
    np.testing.assert_array_equal(init_lib.report_rows(rows, 4, split_rows=10)[:, 0], [1, 2, 4, 5, 7, 8, 10, 11])
    assert init_lib.report_rows(rows[:4], 4).shape == (0, 1) and init_lib.report_rows(rows, 0) is rows
