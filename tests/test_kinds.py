"""Baseline SAE kinds against hand computations on tiny examples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jumprelu
from jumprelu.config import base_config
from jumprelu.core import losses as losses_lib
from jumprelu.core.kinds import from_config, gated, relu, topk
from jumprelu.core.kinds.jumprelu import JumpReLUSAE, Recipe, batchtopk_threshold, init_stats
from jumprelu.core.kinds.jumprelu_loss import make_loss as make_jumprelu_loss
from jumprelu.train.loop import train
from tests.test_train import read_jsonl

X = jnp.array([[1.0, 2.0], [0.5, -1.0], [-2.0, 0.5]])
W_ENC = jnp.array([[1.0, 0.0, -1.0, 0.5], [0.0, 1.0, 1.0, 0.5]])  # [d=2, M=4]
W_DEC = jnp.array([[1.0, 0.0], [0.0, 1.0], [-0.6, 0.8], [0.6, 0.8]])  # unit rows
BASE = {"W_enc": W_ENC, "b_enc": jnp.array([0.1, -0.2, 0.0, 0.3]), "W_dec": W_DEC, "b_dec": jnp.array([0.5, 0.0])}


def _z():
    return (np.asarray(X) - np.asarray(BASE["b_dec"])) @ np.asarray(W_ENC) + np.asarray(BASE["b_enc"])


def test_relu_forward_and_l1_loss():
    model = relu.ReLUSAE(d_model=2, width=4)
    f = np.maximum(_z(), 0)
    x_hat = f @ np.asarray(W_DEC) + np.asarray(BASE["b_dec"])
    out = model.apply({"params": BASE}, X)
    np.testing.assert_allclose(out["f"], f, rtol=1e-6)
    np.testing.assert_allclose(out["l0"], (f > 0).sum(1))
    loss, (m, _) = relu.loss(model, BASE, {}, X, 0.3)
    want = np.mean(np.sum((np.asarray(X) - x_hat) ** 2, 1) + 0.3 * f.sum(1))  # unit decoder rows
    np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_gated_shares_gate_and_magnitude_weights_and_matches_its_jumprelu_export():
    model = gated.GatedSAE(d_model=2, width=4)
    params = dict(BASE, r_mag=jnp.array([0.0, 0.5, -0.3, 1.0]), b_mag=jnp.array([0.2, -0.1, 0.4, 0.0]))
    assert set(model.init(jax.random.key(0), X)["params"]) == set(params)  # no separate W_mag
    pi = _z()
    x_tilde_w = pi - np.asarray(BASE["b_enc"])  # (x - b_dec) W_gate
    z_mag = np.exp(np.asarray(params["r_mag"])) * x_tilde_w + np.asarray(params["b_mag"])
    f = np.where(pi > 0, np.maximum(z_mag, 0), 0)
    out = model.apply({"params": params}, X)
    np.testing.assert_allclose(out["f"], f, rtol=1e-6)
    # Loss: reconstruction + λ·L1 of the gate + auxiliary reconstruction from ReLU(π_gate).
    x, b_dec = np.asarray(X), np.asarray(BASE["b_dec"])
    rec = np.sum((x - (f @ np.asarray(W_DEC) + b_dec)) ** 2, 1)
    aux = np.sum((x - (np.maximum(pi, 0) @ np.asarray(W_DEC) + b_dec)) ** 2, 1)
    loss, _ = gated.loss(model, params, {}, X, 0.2)
    np.testing.assert_allclose(loss, np.mean(rec + 0.2 * np.maximum(pi, 0).sum(1) + aux), rtol=1e-6)
    # The auxiliary term trains no decoder parameter.
    g = jax.grad(lambda p: jnp.mean(jnp.sum((X - model.apply({"params": p}, X)["x_hat_gate"]) ** 2, -1)))(params)
    assert float(jnp.abs(g["W_dec"]).sum()) == 0.0 and float(jnp.abs(g["W_enc"]).sum()) > 0
    # Exactly a JumpReLU SAE.
    jr = gated.to_jumprelu(params)
    jmodel = JumpReLUSAE(d_model=2, width=4, threshold_param="raw")
    jp = {k: jr[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")} | {"threshold": jr["threshold"]}
    np.testing.assert_allclose(jmodel.apply({"params": jp}, X)["f"], f, rtol=1e-6, atol=1e-7)


def test_topk_selects_exactly_k_per_token():
    model = topk.TopKSAE(d_model=2, width=4, k=2)
    out = model.apply({"params": BASE}, X)
    z = _z()
    assert np.all(np.asarray(out["selected"]).sum(1) == 2)
    want = np.zeros_like(z)
    for b in range(3):
        top = np.argsort(-z[b])[:2]
        want[b, top] = np.maximum(z[b, top], 0)
    np.testing.assert_allclose(out["f"], want, rtol=1e-6)


def test_batchtopk_selects_exactly_k_times_b_per_batch_and_learns_its_threshold():
    model = topk.TopKSAE(d_model=2, width=4, k=2, batch=True)
    out = model.apply({"params": BASE}, X)
    z = _z()
    assert int(np.asarray(out["selected"]).sum()) == 6
    cut = np.sort(z.ravel())[-6]
    np.testing.assert_allclose(out["f"], np.where(z >= cut, np.maximum(z, 0), 0), rtol=1e-6)
    per_token = np.asarray(out["selected"]).sum(1)
    assert per_token.tolist() != [2, 2, 2]  # the budget moves between tokens
    loss_fn = topk.make_loss(topk.AuxKConfig(threshold_decay=0.5))
    _, (_, stats) = loss_fn(model, BASE, topk.init_stats(4, batch=True), X, 0.0)
    smallest = np.min(np.asarray(out["f"])[np.asarray(out["f"]) > 0])
    np.testing.assert_allclose(topk.global_threshold(stats), smallest, rtol=1e-6)


def test_auxk_uses_only_dead_latents():
    z = jnp.array([[3.0, 1.0, 2.0, 0.5]])
    x = jnp.array([[1.0, 1.0]])
    x_hat = jnp.array([[0.0, 0.0]])
    dead = jnp.array([False, True, False, True])
    got = topk.auxk_loss(z, x, x_hat, W_DEC, dead, k_aux=1)  # the one dead latent with the largest z: 1
    e_hat = 1.0 * np.asarray(W_DEC)[1]
    np.testing.assert_allclose(got, [np.sum((np.ones(2) - e_hat) ** 2)], rtol=1e-6)
    none = topk.auxk_loss(z, x, x_hat, W_DEC, jnp.zeros(4, bool), k_aux=2)
    assert float(none[0]) == 0.0
    # Counters: a latent that fires is reset; the others age by the batch size.
    model = topk.TopKSAE(d_model=2, width=4, k=1)
    loss_fn = topk.make_loss(topk.AuxKConfig(dead_window=5))
    stats = {"tokens_since_fired": jnp.array([0, 7, 3, 100], jnp.int32)}
    _, (m, new) = loss_fn(model, BASE, stats, X, 0.0)
    fired = np.asarray(model.apply({"params": BASE}, X)["fired_per_latent"]) > 0
    np.testing.assert_array_equal(new["tokens_since_fired"], np.where(fired, 0, np.array([0, 7, 3, 100]) + 3))
    np.testing.assert_allclose(m["dead_fraction"], 0.5)


def test_target_l0_mode_adapts_lambda_towards_the_target():
    model = JumpReLUSAE(d_model=2, width=4, threshold_param="raw", bandwidth=0.5)
    params = dict(BASE, threshold=jnp.full((4,), 0.2))
    l0 = float(jnp.mean(model.apply({"params": params}, X)["l0"]))
    stats = init_stats(Recipe(target_l0=1.0), 4, 0.01)  # the controller's log λ, from λ = 0.01
    for target, sign in ((l0 / 2, 1), (l0 * 2, -1)):  # too many active: λ must rise; too few: fall
        loss_fn = make_jumprelu_loss(target_l0=target, target_rate=0.1, target_gain=0.5)
        total, (_, new) = loss_fn(model, params, stats, X, 123.0)  # the schedule's λ is ignored
        lam = 0.01 * np.exp(0.5 * np.log(l0 / target))  # integral + proportional term
        plain, _ = make_jumprelu_loss()(model, params, {}, X, lam)  # the paper's loss at that λ
        np.testing.assert_allclose(total, plain, rtol=1e-5)
        g = jax.grad(lambda p, fn=loss_fn: fn(model, p, stats, X, 0.0)[0])(params)
        g_plain = jax.grad(lambda p, lam=lam: make_jumprelu_loss()(model, p, {}, X, lam)[0])(params)
        np.testing.assert_allclose(g["threshold"], g_plain["threshold"], rtol=1e-5, atol=1e-8)
        expected = np.log(0.01) + 0.1 * np.log(l0 / target)
        np.testing.assert_allclose(new["log_lambda"], expected, rtol=1e-5)
        assert sign * (float(new["log_lambda"]) - np.log(0.01)) > 0


def test_lambda_floor_stops_the_controllers_wind_up_and_nothing_else():
    """sae.target_l0_lambda_floor κ: while L0 stays below the target the integral I falls by
    rate·log(L0/T) a step, but never below log(κ · mean ‖x − x̂‖² / T); above the floor, and for
    this step's λ, nothing changes."""
    model = JumpReLUSAE(d_model=2, width=4, threshold_param="raw", bandwidth=0.5)
    params = dict(BASE, threshold=jnp.full((4,), 0.2))
    out = model.apply({"params": params}, X)
    l0, mse = float(jnp.mean(out["l0"])), float(jnp.mean(jnp.sum((X - out["x_hat"]) ** 2, -1)))
    target = l0 * 4  # too few active: I falls
    for start, kappa in ((1e-6, 0.5), (1.0, 0.5), (1e-6, 0.0)):
        recipe = Recipe(target_l0=target, target_rate=0.1, lambda_floor=kappa)
        stats = init_stats(recipe, 4, start)
        total, (_, new) = make_jumprelu_loss(recipe=recipe)(model, params, stats, X, 0.0)
        fallen = np.log(start) + 0.1 * np.log(l0 / target)
        floor = np.log(kappa * mse / target) if kappa else -np.inf
        np.testing.assert_allclose(new["log_lambda"], max(fallen, floor), rtol=1e-5)
        lam = start * np.exp(0.5 * np.clip(np.log(l0 / target), -1, 1))  # this step's λ: from I before the update
        np.testing.assert_allclose(total, make_jumprelu_loss()(model, params, {}, X, lam)[0], rtol=1e-5)
    assert np.log(1e-6) + 0.1 * np.log(0.25) < np.log(0.5 * mse / target) < np.log(1.0) - 0.2  # both cases met


def test_target_l0_controller_reads_the_held_out_to_batch_l0_ratio():
    """With sae.target_l0_held_out_rows the controller's L0 is the batch's times the ratio of the
    moving averages of the L0 on held-out rows (the next 128, cycled) and on the batches."""
    model = JumpReLUSAE(d_model=2, width=4, threshold_param="raw", bandwidth=0.5)
    params = dict(BASE, threshold=jnp.full((4,), 0.2))
    recipe = Recipe(target_l0=1.0, target_rate=0.1, held_out_rows=5)
    stats = init_stats(recipe, 4, 0.01, d_model=2)
    held = np.random.default_rng(0).standard_normal((5, 2)).astype(np.float32) * 2
    stats = dict(stats, held_out_rows=jnp.asarray(held), held_out_next=jnp.asarray(3, jnp.int32))
    stats.update(held_out_l0=jnp.float32(1.5), batch_l0=jnp.float32(2.0))
    z_held = (held - np.asarray(BASE["b_dec"])) @ np.asarray(W_ENC) + np.asarray(BASE["b_enc"])
    l0_held = np.mean(np.sum(z_held > 0.2, axis=-1))  # all 5 rows: 128 per step, cycled from row 3
    l0 = float(jnp.mean(model.apply({"params": params}, X)["l0"]))
    ema_held, ema_batch = 0.99 * 1.5 + 0.01 * l0_held, 0.99 * 2.0 + 0.01 * l0
    measured = l0 * ema_held / ema_batch
    assert abs(measured / l0 - 1) > 0.05  # the correction is large enough for the test to fail
    total, (m, new) = make_jumprelu_loss(recipe=recipe)(model, params, stats, X, 0.0)
    error = np.log(measured / 1.0)
    np.testing.assert_allclose(new["log_lambda"], np.log(0.01) + 0.1 * error, rtol=1e-5)
    lam = 0.01 * np.exp(0.5 * np.clip(error, -1, 1))
    plain, _ = make_jumprelu_loss()(model, params, {}, X, lam)
    np.testing.assert_allclose(total, plain, rtol=1e-5)
    np.testing.assert_allclose([new["held_out_l0"], new["batch_l0"]], [ema_held, ema_batch], rtol=1e-6)
    assert int(new["held_out_next"]) == (3 + 5) % 5
    np.testing.assert_allclose(m["held_out_l0_ratio"], ema_held / ema_batch, rtol=1e-5)


def test_quadratic_losses_aim_at_the_corrected_target():
    """With held-out rows a quadratic loss's target is T / ratio: the batch L0 that puts the held-out
    rows' L0 at T (a penalty around T itself would hold the batch at T whatever λ does)."""
    model = JumpReLUSAE(d_model=2, width=4, threshold_param="raw", bandwidth=0.5)
    params = dict(BASE, threshold=jnp.full((4,), 0.2))
    l0_rows = np.asarray(model.apply({"params": params}, X)["l0"])
    for loss in ("quadratic", "quadratic_rows"):
        recipe = Recipe(target_l0=1.0, sparsity_loss=loss, held_out_rows=3)
        stats = dict(init_stats(recipe, 4, 0.01, d_model=2), held_out_rows=X * 3.0)
        stats.update(held_out_l0=jnp.float32(1.8), batch_l0=jnp.float32(1.0))
        total, (m, new) = make_jumprelu_loss(recipe=recipe)(model, params, stats, X, 0.0)
        ratio = float(new["held_out_l0"] / new["batch_l0"])
        assert abs(ratio - 1) > 0.3
        target = 1.0 / ratio
        error = np.log(np.mean(l0_rows) / target)
        lam = 0.01 * np.exp(0.5 * np.clip(error, -1, 1))
        sq = np.mean(np.asarray(losses_lib.squared_error(X, model.apply({"params": params}, X)["x_hat"])))
        if loss == "quadratic":
            penalty = lam * (2 / target) * (np.mean(l0_rows) - target) ** 2
        else:
            penalty = lam * (2 / target) * np.mean((l0_rows - target) ** 2)
        np.testing.assert_allclose(total, sq + penalty, rtol=1e-5)


def test_a_held_out_l0_of_zero_does_not_drop_lambda_to_its_floor():
    """Rows that fire nothing give ratio 0 (an infinite target): the ratio is kept within [0.5, 2]."""
    model = JumpReLUSAE(d_model=2, width=4, threshold_param="raw", bandwidth=0.5)
    params = dict(BASE, threshold=jnp.full((4,), 0.2))
    recipe = Recipe(target_l0=1.0, target_rate=0.1, held_out_rows=4)
    stats = dict(init_stats(recipe, 4, 0.01, d_model=2), held_out_rows=jnp.tile(jnp.array([[-50.0, -60.0]]), (4, 1)))
    _, (m, new) = make_jumprelu_loss(recipe=recipe)(model, params, stats, X, 0.0)
    assert float(new["held_out_l0"]) == 0.0 and float(m["held_out_l0_ratio"]) == 0.5
    l0 = float(jnp.mean(model.apply({"params": params}, X)["l0"]))
    np.testing.assert_allclose(new["log_lambda"], np.log(0.01) + 0.1 * np.log(l0 * 0.5), rtol=1e-5)


def test_held_out_rows_cycle_in_slices_of_128():
    model = JumpReLUSAE(d_model=2, width=4, threshold_param="raw", bandwidth=0.5)
    params = dict(BASE, threshold=jnp.full((4,), 0.2))
    recipe = Recipe(target_l0=1.0, held_out_rows=300)
    rows = np.zeros((300, 2), np.float32)
    rows[250:] = 5.0  # rows 250..299 fire more latents than the rest
    stats = dict(init_stats(recipe, 4, 0.01, d_model=2), held_out_rows=jnp.asarray(rows))
    loss_fn = make_jumprelu_loss(recipe=recipe)
    seen = []
    for _ in range(3):  # rows 0-127, 128-255, then 256-299 and 0-83
        _, (_, stats) = loss_fn(model, params, stats, X, 0.0)
        seen.append(int(stats["held_out_next"]))
    assert seen == [128, 256, 84]
    z = (rows - np.asarray(BASE["b_dec"])) @ np.asarray(W_ENC) + np.asarray(BASE["b_enc"])
    per_row = np.sum(z > 0.2, axis=-1)
    slices = [per_row[:128], per_row[128:256], np.concatenate([per_row[256:], per_row[:84]])]
    ema = 0.0
    for s in slices:
        ema = 0.99 * ema + 0.01 * np.mean(s)
    np.testing.assert_allclose(stats["held_out_l0"], ema, rtol=1e-5)


def test_every_kind_builds_from_config():
    for name in ("jumprelu", "relu", "gated", "topk", "batchtopk"):
        c = base_config().sae
        c.kind, c.width, c.k = name, 8, 3
        kind = from_config(c, 4)
        params = kind.model.init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
        x = jax.random.normal(jax.random.key(1), (16, 4))
        loss, (metrics, stats) = kind.loss(kind.model, params, kind.init_stats(), x, 0.01)
        assert np.isfinite(float(loss)) and {"mse", "l0", "fvu"} <= set(metrics)
        exported = kind.export(params, stats)
        assert exported["W_enc"].shape == (4, 8) and exported["threshold"].shape == (8,)


@pytest.mark.parametrize("name", ["relu", "gated", "topk", "batchtopk"])
def test_each_kind_trains_sharded_checkpoints_and_loads(tmp_path, tiny_config, name):
    """The real loop on a (2, 4) mesh of simulated devices; `jumprelu.load` reproduces the report's eval."""
    tiny_config.sae.update(kind=name, dead_window_tokens=256)
    if name in ("topk", "batchtopk"):  # the others refuse fields they would not read
        tiny_config.sae.update(k=4, aux_k=8, batchtopk_threshold_decay=0.9)
    tiny_config.mesh.update(data=2, model=4)
    tiny_config.train.steps = 20
    report = train(tiny_config, str(tmp_path / "run"))
    assert np.isfinite(report["eval"]["fvu"]) and report["eval"]["fvu"] < 1.0
    sae = jumprelu.load(str(tmp_path / "run"))
    assert sae.step == 20 and (sae.k == 4) == (name == "topk")
    rows = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    f = np.asarray(sae.encode(rows))
    if name == "topk":
        assert np.all((f > 0).sum(1) <= 4)
    np.testing.assert_allclose(sae(rows), f @ np.asarray(sae.W_dec) + np.asarray(sae.b_dec), rtol=1e-5, atol=1e-5)


def test_target_l0_mode_moves_l0_to_the_target(tmp_path, tiny_config):
    tiny_config.sae.update(threshold_param="raw", threshold_init=0.001, target_l0=8.0)
    tiny_config.train.update(steps=200, lr=3e-3)
    tiny_config.ckpt.every_steps = 200
    report = train(tiny_config, str(tmp_path / "run"))
    start = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]["l0"]
    assert abs(report["eval"]["l0"] - 8.0) < abs(start - 8.0) / 2, (start, report["eval"]["l0"])


def test_batchtopk_phase_then_hand_over_to_per_latent_thresholds():
    """In the phase the latents fire at the batch's BatchTopK threshold t (exactly k·B entries)
    while θ trains in the shadow: the reconstruction error and L0 of the SAE firing at θ, with the
    controller on that L0, train θ alone. From step batchtopk_steps on, the loss is the recipe's own."""
    model = JumpReLUSAE(d_model=2, width=4, threshold_param="raw", bandwidth=0.5)
    params = dict(BASE, threshold=jnp.full((4,), 0.4))
    recipe = Recipe(target_l0=2.0, batchtopk_steps=1)
    loss_fn = make_jumprelu_loss(recipe=recipe)
    stats = init_stats(recipe, 4, 0.01)
    z = _z()
    top = np.sort(z.ravel())[::-1]
    t = float(batchtopk_threshold(jnp.asarray(z), 2))
    assert top[6] <= t < top[5] and top[6] > 0  # exactly the k·B = 2 · 3 = 6 largest are above it
    f = z * (z > t)
    x, w_dec = np.asarray(X), np.asarray(W_DEC)
    resid = x - (f @ w_dec + np.asarray(BASE["b_dec"]))
    err = np.sum(resid**2, axis=-1)
    l0_theta = np.sum(z > 0.4, axis=-1)
    assert np.mean(l0_theta) != 2.0  # θ's L0 differs from the phase's, so the test can fail
    error = np.log(np.mean(l0_theta) / 2.0)
    lam = 0.01 * np.exp(0.5 * np.clip(error, -1, 1))
    total, (m, new) = loss_fn(model, params, stats, X, 0.0)
    err_theta = np.sum((x - (z * (z > 0.4)) @ w_dec - np.asarray(BASE["b_dec"])) ** 2, axis=-1)
    np.testing.assert_allclose(total, np.mean(err + lam * l0_theta + err_theta), rtol=1e-5)
    np.testing.assert_allclose(m["l0"], np.mean(l0_theta), rtol=1e-6)
    np.testing.assert_allclose(new["log_lambda"], np.log(0.01) + 0.01 * error, rtol=1e-6)
    assert int(new["steps_seen"]) == 1 and float(m["batchtopk_phase"]) == 1.0
    g = jax.grad(lambda p: loss_fn(model, p, stats, X, 0.0)[0])(params)
    # θ's gradient: the paper's, from the reconstruction of the SAE firing at θ (not at t)
    f_theta = z * (z > 0.4)
    resid_theta = x - (f_theta @ w_dec + np.asarray(BASE["b_dec"]))
    g_f = -2 * resid_theta @ w_dec.T / 3  # ∂ mean_b ‖x_b - x̂_θ,b‖² / ∂f_θ
    want = np.zeros(4)
    for b, i in np.ndindex(z.shape):
        if abs(z[b, i] - 0.4) < 0.25:  # the kernel window at θ = 0.4, ε = 0.5
            want[i] += -(0.4 / 0.5) * g_f[b, i] - lam / 3 / 0.5
    assert np.any(want != 0)
    np.testing.assert_allclose(g["threshold"], want, rtol=1e-5, atol=1e-7)

    # the other parameters learn from the t forward alone: its error, not the shadow's
    def t_forward_error(p):
        zz = (X - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        ff = zz * (zz > t)
        return jnp.mean(jnp.sum((X - (ff @ p["W_dec"] + p["b_dec"])) ** 2, axis=-1))

    g_t = jax.grad(t_forward_error)(params)
    for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(g[k], g_t[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # after the phase: the recipe without it, value and gradients
    plain_recipe = Recipe(target_l0=2.0)
    after = dict(init_stats(plain_recipe, 4, 0.01), steps_seen=jnp.asarray(1, jnp.int32))
    plain = make_jumprelu_loss(recipe=plain_recipe)
    total, (m, _) = loss_fn(model, params, after, X, 0.0)
    np.testing.assert_allclose(total, plain(model, params, init_stats(plain_recipe, 4, 0.01), X, 0.0)[0], rtol=1e-6)
    assert float(m["batchtopk_phase"]) == 0.0
    g = jax.grad(lambda p: loss_fn(model, p, after, X, 0.0)[0])(params)
    g_plain = jax.grad(lambda p: plain(model, p, init_stats(plain_recipe, 4, 0.01), X, 0.0)[0])(params)
    for k in g:
        np.testing.assert_allclose(g[k], g_plain[k], rtol=1e-5, atol=1e-8, err_msg=k)


def test_frequency_penalty_waits_for_the_hand_over():
    """With the BatchTopK phase the frequency penalty is 0 in the phase (value and θ-gradient) and
    the recipe's own after it."""
    model = JumpReLUSAE(d_model=2, width=4, threshold_param="raw", bandwidth=0.5)
    params = dict(BASE, threshold=jnp.full((4,), 0.4))
    penalised = Recipe(target_l0=2.0, batchtopk_steps=1, frequency_penalty=0.5, frequency_limit=0.2)
    plain = Recipe(target_l0=2.0, batchtopk_steps=1)
    stats = init_stats(plain, 4, 0.01)
    after = dict(stats, steps_seen=jnp.asarray(1, jnp.int32))

    def run(recipe, st):
        fn = make_jumprelu_loss(recipe=recipe)
        return jax.value_and_grad(lambda p: fn(model, p, st, X, 0.0)[0])(params)

    (v_pen, g_pen), (v, g) = run(penalised, stats), run(plain, stats)
    np.testing.assert_allclose(v_pen, v, rtol=1e-6)
    np.testing.assert_allclose(g_pen["threshold"], g["threshold"], rtol=1e-6)
    (v_pen, _), (v, _) = run(penalised, after), run(plain, after)
    z = _z()
    want = 0.5 * np.sum(np.maximum(np.mean(z > 0.4, axis=0) - 0.2, 0.0))
    assert want > 0
    np.testing.assert_allclose(v_pen - v, want, rtol=1e-5)


def test_batchtopk_threshold_counts_exactly_k_per_row_on_average():
    z = jax.random.normal(jax.random.key(3), (64, 256))
    for k in (1, 5, 40):
        t = batchtopk_threshold(z, k)
        assert int(jnp.sum(z > t)) == k * 64
    assert float(batchtopk_threshold(-jnp.abs(z), 5)) == 0.0  # nothing positive: θ stays at 0


def test_batchtopk_threshold_stops_early_with_the_mask_of_32_halvings():
    """The early stop (a midpoint with exactly k·B above it) gives the set of entries 32 halvings
    give, also with ties at the k·B-th value, where no midpoint has exactly k·B above it."""
    z = jax.random.normal(jax.random.key(4), (64, 256))

    def full_bisection(z, k):
        n, lo, hi = k * z.shape[0], 0.0, float(jnp.max(z))
        for _ in range(32):
            mid = np.float32(0.5) * (np.float32(lo) + np.float32(hi))
            lo, hi = (mid, hi) if int(jnp.sum(z > mid)) >= n else (lo, mid)
        return lo

    tied = jnp.where(jnp.abs(z - 1.0) < 0.05, 1.0, z)  # ~400 entries equal the 40·64-th value
    assert int(jnp.sum(tied > 1.0)) < 40 * 64 <= int(jnp.sum(tied >= 1.0))
    for zz, k in ((z, 5), (z, 40), (tied, 40)):
        np.testing.assert_array_equal(zz > batchtopk_threshold(zz, k), zz > full_bisection(zz, k))
