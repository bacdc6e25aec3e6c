"""The sparse JumpReLU step (core/sparse.py) gives the dense step's numbers: outputs, every
gradient and the updated state, with spilled rows, overflowing batches, rows with no active
latent and entries inside and at the edge of the kernel window; through the real loop on 1 and
8 simulated devices; and `sae.sparse=auto` is a deterministic, recorded choice."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jumprelu
from jumprelu.config import ConfigError, validate
from jumprelu.core import sparse, sparse_index
from jumprelu.core.kinds import jumprelu as jumprelu_kind
from jumprelu.train.loop import train

B, D, M = 512, 16, 256
EPS = 0.3


def _problem(seed=0, big_rows=0.01):
    k = jax.random.split(jax.random.key(seed), 7)
    x = jax.random.normal(k[0], (B, D))
    x = x * (1 + 3 * (jax.random.uniform(k[6], (B, 1)) < big_rows))  # a few rows fire many latents
    params = (
        jax.random.normal(k[1], (D, M)) / 4,  # W_enc
        0.1 * jax.random.normal(k[2], (M,)),  # bias
        1.5 + 0.5 * jnp.abs(jax.random.normal(k[3], (M,))),  # θ
        jax.random.normal(k[4], (M, D)) / 4,  # W_dec
        0.1 * jax.random.normal(k[5], (D,)),  # b_dec
    )
    return x, params


def _objective(forward, x):
    """A loss touching every output with distinct weights, so every cotangent is exercised."""

    def fn(*params):
        x_hat, l0, counts, f_sum = forward(x, *params)[:4]
        return (
            jnp.sum(jnp.square(x_hat - x))
            + 0.3 * jnp.sum(l0 * jnp.cos(jnp.arange(x.shape[0])))
            + jnp.sum(jnp.sin(jnp.arange(M)) * counts)
            + jnp.sum(jnp.cos(jnp.arange(M)) * f_sum)
        )

    return fn


def _compare(x, params, capacity, eps=EPS):
    dense = _objective(lambda x_, *p: sparse.dense_forward(x_, *p, eps), x)
    sp = _objective(lambda x_, *p: sparse.sparse_forward(x_, *p, jnp.float32(eps), capacity), x)
    argnums = tuple(range(5))
    v_dense, g_dense = jax.jit(jax.value_and_grad(dense, argnums=argnums))(*params)
    v_sparse, g_sparse = jax.jit(jax.value_and_grad(sp, argnums=argnums))(*params)
    np.testing.assert_allclose(v_sparse, v_dense, rtol=1e-6)
    for name, a, b in zip(("W_enc", "bias", "theta", "W_dec", "b_dec"), g_dense, g_sparse, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(a))), err_msg=name)
    outs = jax.jit(lambda: sparse.sparse_forward(x, *params, jnp.float32(eps), capacity))()
    for a, b in zip(sparse.dense_forward(x, *params, eps), outs[:4], strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    return float(outs[4])


def _candidates_per_row(x, params, eps=EPS):
    w_enc, bias, theta = params[:3]
    z = x @ w_enc + bias
    return np.asarray(jnp.sum((z - theta) / eps > -0.5, axis=-1))


def _fitting(x, params, eps=EPS):
    """The capacity that holds every candidate of the batch: the sparse path, no spill."""
    cand = _candidates_per_row(x, params, eps)
    return sparse.Capacity(per_row=int(cand.max()), per_batch=int(cand.sum()), spill=1)


def test_sparse_equals_dense_when_everything_fits():
    x, params = _problem()
    cap = _fitting(x, params)
    assert _compare(x, params, cap) == 0.0


@pytest.mark.parametrize("spare", [1, 5])
def test_rows_beyond_the_row_capacity_are_spilled_not_truncated(spare):
    """spare 1: the spill slots are all used; 5: the spilled rows fit the smaller size (a
    quarter of the slots) the step computes them at."""
    x, params = _problem()
    cand = _candidates_per_row(x, params)
    per_row = int(np.quantile(cand, 0.98))
    spilled = int(np.sum(cand > per_row))
    assert spilled >= 2
    cap = sparse.Capacity(per_row=per_row, per_batch=int(cand.sum()), spill=spare * spilled)
    assert _compare(x, params, cap) == 0.0  # sparse path with dense spill rows, same numbers


@pytest.mark.parametrize("which", ["rows", "batch"])
def test_an_overflowing_batch_takes_the_dense_path(which):
    x, params = _problem()
    cand = _candidates_per_row(x, params)
    if which == "rows":  # more rows beyond per_row than spill slots
        cap = sparse.Capacity(per_row=int(np.median(cand)), per_batch=int(cand.sum()), spill=1)
    else:  # the entries of the batch exceed per_batch
        cap = sparse.Capacity(per_row=int(cand.max()), per_batch=int(cand.sum()) - 1, spill=1)
    assert _compare(x, params, cap) == 1.0


def test_rows_with_no_active_latent():
    x, params = _problem(big_rows=0.0)
    x = x.at[: B // 2].set(0.0)  # z = bias < θ: these rows fire nothing
    w_enc, bias, theta, w_dec, b_dec = params
    params = (w_enc, jnp.minimum(bias, 0.0), theta, w_dec, b_dec)
    cand = _candidates_per_row(x, params)
    assert cand[: B // 2].max() == 0 and cand.sum() > 0
    cap = sparse.Capacity(per_row=int(cand.max()), per_batch=int(cand.sum()), spill=1)
    assert _compare(x, params, cap) == 0.0


@pytest.mark.parametrize("width,slots", [(64, 24), (100, 24), (1000, 24), (1000, 1), (1000, 32), (1000, 33)])
def test_first_candidates_of_each_row_found_without_a_sort(width, slots):
    """first_set returns each row's first candidates in latent order and its count, for widths
    not a multiple of the 32-bit words, empty rows, full rows, rows beyond the slots, more slots
    than words, and a word whose first candidate takes the last slot."""
    rng = np.random.default_rng(width + slots)
    density = rng.choice([0.0, 0.01, 0.1, 1.0], size=(40, 1))
    cand = rng.random((40, width)) < density
    cand[0] = False
    cand[0, : slots - 1] = True  # slots - 1 candidates in the first words...
    cand[0, width - 1] = True  # ...and the last word's first candidate at rank slots - 1
    idx, count = jax.jit(sparse_index.first_set, static_argnums=1)(jnp.asarray(cand), slots)
    for row, (c, got, n) in enumerate(zip(cand, np.asarray(idx), np.asarray(count), strict=True)):
        want = np.flatnonzero(c)
        assert n == len(want), row
        used = min(len(want), slots)
        np.testing.assert_array_equal(got[:used], want[:used])


@pytest.mark.parametrize("width", [300, 2**27])  # blocks of chunks sorted by one key; argsort
def test_entries_ordered_by_latent_within_every_chunk(width):
    total, used = 512, 450
    lat = jnp.asarray(np.random.default_rng(0).integers(0, min(width, 300), total), jnp.int32)
    valid = jnp.arange(total) < used
    order, s_lat = jax.jit(sparse_index.by_latent, static_argnums=(2, 3))(lat, valid, width, 64)
    order, s_lat = np.asarray(order), np.asarray(s_lat)
    assert sorted(order) == list(range(total))  # a permutation
    assert set(order[:used]) == set(range(used))  # the valid entries stay the prefix
    np.testing.assert_array_equal(s_lat[:used], np.asarray(lat)[order[:used]])
    assert (s_lat[used:] == width).all()
    for start in range(0, total, 64):
        assert (np.diff(s_lat[start : start + 64]) >= 0).all()


def test_theta_gradient_inside_and_at_the_edge_of_the_window():
    """Row 0's z placed at θ + offset·ε for one latent per offset: the θ-gradient is the dense
    ops' exactly, inside the window, on its edges and just outside."""
    x, params = _problem(big_rows=0.0)
    w_enc, bias, theta, w_dec, b_dec = params
    z = x @ w_enc + bias
    offsets = jnp.array([-0.51, -0.5, -0.49, 0.0, 0.49, 0.5, 0.51])
    theta = theta.at[: len(offsets)].set(z[0, : len(offsets)] - offsets * EPS)
    params = (w_enc, bias, theta, w_dec, b_dec)
    cap = _fitting(x, params)
    assert _compare(x, params, cap) == 0.0


def test_bfloat16_matmuls_match_the_dense_bfloat16_step():
    x, params = _problem()
    cap = _fitting(x, params)
    bf16 = jnp.dtype(jnp.bfloat16)
    dense = _objective(lambda x_, *p: sparse.dense_forward(x_, *p, EPS, bf16), x)
    sp = _objective(lambda x_, *p: sparse.sparse_forward(x_, *p, jnp.float32(EPS), cap, bf16), x)
    g_dense = jax.grad(dense, argnums=(0, 1, 2, 3, 4))(*params)
    g_sparse = jax.grad(sp, argnums=(0, 1, 2, 3, 4))(*params)
    # The operands are rounded to bf16 alike, but the dense step's weight gradients come back through
    # the bf16 cast of W (its cotangent is bf16), so they carry one more bf16 rounding: agreement to
    # bf16 precision (8 bits of mantissa).
    for a, b in zip(g_dense, g_sparse, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-2, atol=1e-2 * float(jnp.max(jnp.abs(a))))


def _loss_pair(tiny_config, **sae):
    cfg = tiny_config
    cfg.sae.update(width=M, threshold_init=3.0, bandwidth=EPS, **sae)
    dense = jumprelu_kind.Recipe.from_config(cfg.sae)
    kind = jumprelu.core.kinds.from_config(cfg.sae, D)
    params = kind.model.init(jax.random.key(0), jnp.zeros((2, D)))["params"]
    stats = kind.init_stats()
    if "tokens_since_fired" in stats:  # every third latent dead
        stats["tokens_since_fired"] = jnp.where(jnp.arange(M) % 3 == 0, 10**6, 0).astype(jnp.int32)
    x = 2.0 * jax.random.normal(jax.random.key(1), (B, D))
    out = {}
    for name, recipe in (("dense", dense), ("sparse", dataclasses.replace(dense, sparse_capacity=128))):
        loss = jumprelu_kind.make_loss(recipe=recipe)
        fn = jax.jit(jax.value_and_grad(lambda p, r=loss: r(kind.model, p, stats, x, 0.1), has_aux=True))
        out[name] = fn(params)
    return out


def _assert_same_loss(sparse, dense, stats_rtol: float):
    """((loss, (metrics, stats)), grads) of the sparse and dense paths agree: loss and metrics to
    float32 rounding, stats to stats_rtol, gradients relative to their largest entry."""
    (v_d, (m_d, s_d)), g_d = dense
    (v_s, (m_s, s_s)), g_s = sparse
    np.testing.assert_allclose(v_s, v_d, rtol=1e-5)
    for key in m_d:
        np.testing.assert_allclose(m_s[key], m_d[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for key in s_d:
        np.testing.assert_allclose(s_s[key], s_d[key], rtol=stats_rtol, err_msg=key)
    for key in g_d:
        scale = float(jnp.max(jnp.abs(g_d[key])))
        np.testing.assert_allclose(g_s[key], g_d[key], rtol=1e-4, atol=1e-5 * scale, err_msg=key)


@pytest.mark.parametrize("param", ["log", "raw"])
@pytest.mark.parametrize("loss", ["step", "quadratic", "quadratic_rows"])
def test_every_supported_option_gives_the_dense_loss_gradients_and_stats(tiny_config, param, loss):
    out = _loss_pair(
        tiny_config,
        threshold_param=param,
        sparsity_loss=loss,
        target_l0=8.0,
        pre_act_coefficient=1e-2,
        dead_window_tokens=1,
        frequency_penalty=1.0,
        frequency_limit=0.02,
        frequency_allowance=0.1,
        bandwidth_mode="relative",
    )
    (v_d, (m_d, s_d)), g_d = out["dense"]
    (v_s, (m_s, s_s)), g_s = out["sparse"]
    assert float(m_s["sparse_step"]) == 1.0 and float(m_d.pop("sparse_step")) == 0.0
    assert 0 < float(m_d["pre_act_loss"]) and 0 < float(m_d["frequency_penalty"])
    _assert_same_loss(out["sparse"], out["dense"], stats_rtol=1e-5)


@pytest.mark.parametrize("steps_seen", [2, 7])  # in the BatchTopK phase (5 steps), then after it
@pytest.mark.parametrize(
    ("param", "loss", "bandwidth_mode"), [("raw", "step", "absolute"), ("log", "quadratic", "relative")]
)
def test_batchtopk_phase_then_sparse_gives_the_dense_loss(tiny_config, steps_seen, param, loss, bandwidth_mode):
    """With the recipe's BatchTopK phase the sparse plan keeps the phase dense and takes the sparse
    step after the hand-over; both give the dense loss, metrics, stats and gradients."""
    cfg = tiny_config
    cfg.sae.update(width=M, threshold_init=3.0, bandwidth=EPS, threshold_param=param, target_l0=8.0)
    cfg.sae.update(sparsity_loss=loss, bandwidth_mode=bandwidth_mode)
    cfg.sae.update(batchtopk_fraction=0.5, pre_act_coefficient=1e-2, dead_window_tokens=1)
    cfg.sae.update(frequency_penalty=1.0, frequency_limit=0.02, target_l0_held_out_rows=16)
    dense = jumprelu_kind.Recipe.from_config(cfg.sae, train_steps=10)
    assert dense.batchtopk_steps == 5 and dense.sparse_capacity == 0
    kind = jumprelu.core.kinds.from_config(cfg.sae, D)
    params = kind.model.init(jax.random.key(0), jnp.zeros((2, D)))["params"]
    stats = dict(kind.init_stats(), steps_seen=jnp.asarray(steps_seen, jnp.int32))
    stats["held_out_rows"] = 2.0 * jax.random.normal(jax.random.key(2), (16, D))
    x = 2.0 * jax.random.normal(jax.random.key(1), (B, D))
    out = {}
    for name, recipe in (("dense", dense), ("sparse", dataclasses.replace(dense, sparse_capacity=128))):
        loss = jumprelu_kind.make_loss(recipe=recipe)
        out[name] = jax.jit(jax.value_and_grad(lambda p, r=loss: r(kind.model, p, stats, x, 0.1), has_aux=True))(params)
    (_, (m_d, s_d)), _ = out["dense"]
    (_, (m_s, s_s)), _ = out["sparse"]
    in_phase = steps_seen < 5
    assert float(m_d["batchtopk_phase"]) == float(m_s["batchtopk_phase"]) == float(in_phase)
    assert float(m_s.pop("sparse_step")) == float(not in_phase) and float(m_d.pop("sparse_step")) == 0.0
    assert int(s_s["steps_seen"]) == int(s_d["steps_seen"]) == steps_seen + 1
    assert set(m_s) == set(m_d)
    _assert_same_loss(out["sparse"], out["dense"], stats_rtol=1e-5)


def test_recipe_with_its_phase_trains_sparse_after_the_hand_over_like_dense(tmp_path, tiny_config):
    """The real loop: the phase's steps dense, the rest sparse, the same parameters as all-dense."""
    cfg = _sparse_run_config(tiny_config, "on")
    cfg.sae.update(batchtopk_fraction=0.5, target_l0_held_out_rows=256)
    cfg.train.update(steps=60)
    cfg.ckpt.every_steps = 60
    cfg.log.every_steps = 5
    saes = _train_dense_and_sparse(cfg, tmp_path)
    for k, v in saes["off"].items():
        np.testing.assert_allclose(saes["on"][k], v, rtol=1e-3, atol=1e-4, err_msg=k)
    rows = [json.loads(line) for line in open(os.path.join(tmp_path, "on", "metrics.jsonl"))]
    rows = [r for r in rows if "sparse_step" in r]
    assert {r["sparse_step"] for r in rows if r["batchtopk_phase"] == 1.0} == {0.0}
    assert rows[-1]["batchtopk_phase"] == 0.0 and rows[-1]["sparse_step"] == 1.0


def _sparse_run_config(cfg, sparse_mode):
    cfg.sae.update(
        threshold_param="raw",
        threshold_init=0.3,
        target_l0=4.0,
        bandwidth=0.05,
        pre_act_coefficient=1e-3,
        dead_window_tokens=1024,
        sparse=sparse_mode,
        sparse_capacity=32,
    )
    return cfg


def _train_dense_and_sparse(cfg, tmp_path) -> dict:
    """Params after training cfg with sae.sparse off and on, each in its own workdir."""
    params = {}
    for mode in ("off", "on"):
        cfg.sae.sparse = mode
        train(cfg, str(tmp_path / mode))
        params[mode] = jumprelu.load(str(tmp_path / mode)).params()
    return params


def test_the_loop_goes_dense_then_sparse_with_the_same_parameters(tmp_path, tiny_config):
    """The real loop, sparse vs dense: the sparse run takes the dense path for the early high-L0
    batches (about 75-90 steps here, alternating at the end) and the sparse one after, as its metrics
    record, and ends with the dense run's parameters. 100 steps, not more: past ~110 a pre-activation within float32
    rounding of its threshold fires in one run and not the other, and from then on the two runs
    part as any two summation orders would (at 300 steps sparse-vs-dense moved the parameters by
    1.5-2.4% (Frobenius), dropping the pre-activation loss altogether by 2.4-3.5%), so a longer
    comparison cannot tell a bug from rounding, and where the tie falls depends on the CPU."""
    cfg = _sparse_run_config(tiny_config, "on")
    cfg.sae.threshold_init = 0.05  # the first batches fire too many latents for the capacity
    cfg.train.update(steps=100)
    cfg.ckpt.every_steps = 100
    cfg.log.every_steps = 5
    saes = _train_dense_and_sparse(cfg, tmp_path)
    for k, v in saes["off"].items():
        np.testing.assert_allclose(saes["on"][k], v, rtol=1e-3, atol=1e-4, err_msg=k)
    rows = [json.loads(line) for line in open(os.path.join(tmp_path, "on", "metrics.jsonl"))]
    taken = [r["sparse_step"] for r in rows if "sparse_step" in r]
    assert taken and taken[-1] == 1.0 and 0.0 in taken  # sparse at the end, dense at the start
    dense_rows = [json.loads(line) for line in open(os.path.join(tmp_path, "off", "metrics.jsonl"))]
    assert {r["sparse_step"] for r in dense_rows if "sparse_step" in r} == {0.0}
    # A logged sparse_step is the share of the steps since the last log that ran sparse, so a dense
    # fallback between logs is counted: the same run logged at every step gives each window's steps.
    cfg.log.every_steps = 1
    train(cfg, str(tmp_path / "every_step"))
    each = [json.loads(line) for line in open(os.path.join(tmp_path, "every_step", "metrics.jsonl"))]
    each = {r["step"]: r["sparse_step"] for r in each if "sparse_step" in r}
    windows = {r["step"]: r["sparse_step"] for r in rows if "sparse_step" in r}
    for step, share in windows.items():
        assert share == pytest.approx(np.mean([each[s] for s in range(step - 4, step + 1)])), step
    assert any(0.0 < share < 1.0 for share in windows.values())  # a window of both kinds of step


@pytest.mark.parametrize("phase", [0.0, 0.5])  # 0.5: the recipe's BatchTopK phase (dense), then sparse
def test_sparse_step_trains_sharded_like_on_one_device(tmp_path, tiny_config, phase):
    cfg = _sparse_run_config(tiny_config, "on")
    cfg.sae.batchtopk_fraction = phase
    cfg.train.steps = 30
    results = {}
    for shape in [(1, 1), (2, 4)]:
        cfg.mesh.data, cfg.mesh.model = shape
        train(cfg, str(tmp_path / f"{shape}"))
        results[shape] = jumprelu.load(str(tmp_path / f"{shape}")).params()
    for k, v in results[(1, 1)].items():
        np.testing.assert_allclose(results[(2, 4)][k], v, rtol=2e-4, atol=2e-5, err_msg=k)


def test_auto_is_deterministic_and_explained(tiny_config):
    s = tiny_config.sae
    s.update(width=65536, target_l0=50.0, sparse="auto")
    plans = {jumprelu_kind.sparse_plan(s) for _ in range(3)}
    assert len(plans) == 1
    s.update(sparsity_loss="tanh")
    assert jumprelu_kind.sparse_plan(s) == (0, "auto: dense (sae.sparsity_loss=tanh needs f for every latent)")
    s.update(sparsity_loss="step", ste_pre_activations=True)
    assert jumprelu_kind.sparse_plan(s) == (0, "auto: dense (sae.ste_pre_activations needs f for every latent)")
    s.update(ste_pre_activations=False, batchtopk_fraction=0.8)
    phase_plan = "auto: sparse, 1024 entries per row after the BatchTopK phase (dense)"
    assert jumprelu_kind.sparse_plan(s) == (1024, phase_plan)
    s.update(batchtopk_fraction=0.0, target_l0=None)
    assert jumprelu_kind.sparse_plan(s)[0] == 0
    # where it was measured (README "Step speed"): 4K latents, dense below and above 1/8 kept per row
    s.update(width=4096, target_l0=50.0)
    assert jumprelu_kind.sparse_plan(s) == (400, "auto: sparse, 400 entries per row")
    s.update(target_l0=100.0)
    assert jumprelu_kind.sparse_plan(s) == (0, "auto: dense (capacity 800 > width/8)")
    s.update(width=2048, target_l0=20.0)
    assert jumprelu_kind.sparse_plan(s) == (
        0,
        "auto: dense (width 2048 < 4096, where the sparse step was not measured faster)",
    )
    s.update(sparse="off", target_l0=50.0)
    assert jumprelu_kind.sparse_plan(s) == (0, "sae.sparse=off")
    s.update(sparse="on", sparse_capacity=24)
    assert jumprelu_kind.sparse_plan(s) == (24, "sae.sparse=on")


def test_auto_on_gpu_is_sparse_only_where_it_was_measured_faster(tiny_config, monkeypatch):
    """On an H200 the sparse step lost with the dense step's TF32 products and won with float32
    ones from 16K latents (README "Step speed", accelerators); TPU is not measured."""
    s = tiny_config.sae
    s.update(width=16384, target_l0=50.0, sparse="auto")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    why = "on gpu the sparse step was measured faster only with sae.compute_dtype=float32 with"
    assert jumprelu_kind.sparse_plan(s) == (0, f"auto: dense ({why} sae.matmul_precision=highest)")
    s.update(matmul_precision="highest")
    assert jumprelu_kind.sparse_plan(s) == (400, "auto: sparse, 400 entries per row")
    s.update(compute_dtype="bfloat16")
    assert jumprelu_kind.sparse_plan(s)[0] == 0
    s.update(matmul_precision="high", compute_dtype="float32")  # JAX's high is TF32 on GPU
    assert jumprelu_kind.sparse_plan(s)[0] == 0
    s.update(matmul_precision="highest", target_l0=100.0)  # 800 kept of 16K: more than was measured there
    assert jumprelu_kind.sparse_plan(s) == (0, "auto: dense (capacity 800 > width/32)")
    s.update(target_l0=50.0, width=8192)
    assert jumprelu_kind.sparse_plan(s) == (
        0,
        "auto: dense (width 8192 < 16384, where the sparse step was not measured faster)",
    )
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    s.update(width=16384)
    assert jumprelu_kind.sparse_plan(s) == (0, "auto: dense (the sparse step is not yet measured on tpu)")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sparse": "yes"}, r"^config field sae.sparse must be one of \('auto', 'on', 'off'\), found 'yes'$"),
        ({"sparse": "on", "sparsity_loss": "tanh"}, r"^config field sae.sparsity_loss must be 'step' or a quadratic"),
        ({"sparse": "on"}, r"^config field sae.sparse_capacity must be > 0 \(or sae.target_l0 set\)"),
        (
            {"sparse": "on", "target_l0": 8.0, "ste_pre_activations": True},
            r"^config field sae.ste_pre_activations must be False with sae.sparse=on",
        ),
        ({"sparse_capacity": -1}, r"^config field sae.sparse_capacity must be >= 0"),
    ],
)
def test_bad_sparse_fields_are_named(tiny_config, fields, message):
    tiny_config.sae.update(**fields)
    with pytest.raises(ConfigError, match=message):
        validate(tiny_config)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="auto's choice is measured on XLA:CPU")
def test_the_compiled_program_follows_the_plan(tiny_config):
    from jumprelu.train import program, sharding

    cfg = tiny_config
    cfg.sae.update(width=16384, target_l0=8.0)  # auto on CPU: sparse from 4K latents
    mesh = sharding.make_mesh(cfg.mesh)
    assert program.build(cfg, 32, mesh).step_path == "auto: sparse, 256 entries per row"
    cfg.stack.sparsity_coefficients = (0.01, 0.02)  # vmapped members: the dense step
    assert program.build(cfg, 32, mesh).step_path == "auto: dense (stacked SAEs)"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="auto's choice is measured on XLA:CPU")
@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_topk_auto_decoder_plan_is_deterministic_and_compiled(tiny_config, kind):
    """auto on CPU: the sparse decoder from 16K latents (measured faster there) while its gathered
    [B, k, d] rows stay within twice the dense [B, width] arrays; dense otherwise."""
    from jumprelu.core.kinds import topk as topk_kind
    from jumprelu.train import program, sharding

    cfg = tiny_config
    cfg.sae.update(kind=kind, k=8, width=16384, sparse="auto")
    assert {topk_kind.decoder_plan(cfg.sae, 32) for _ in range(3)} == {
        (True, "auto: sparse decoder (the 8 selected latents of each row)")
    }
    mesh = sharding.make_mesh(cfg.mesh)
    built = program.build(cfg, 32, mesh)
    assert built.model.sparse_decoder and built.step_path.startswith("auto: sparse decoder")
    assert topk_kind.decoder_plan(cfg.sae, 4096 + 1) == (
        False,
        "auto: dense decoder (k·d_model = 32776 > 2 × width: its gathered rows would outgrow the dense arrays)",
    )
    cfg.sae.width = 4096
    assert topk_kind.decoder_plan(cfg.sae, 32) == (
        False,
        "auto: dense decoder (width 4096 < 16384, where it was not measured faster)",
    )
    cfg.sae.sparse = "on"
    assert topk_kind.decoder_plan(cfg.sae, 32) == (True, "sae.sparse=on")
    cfg.sae.update(width=16384, sparse="off")
    assert program.build(cfg, 32, mesh).step_path == "sae.sparse=off"
    cfg.sae.sparse = "yes"
    with pytest.raises(ConfigError, match=r"^config field sae.sparse must be one of"):
        validate(cfg)


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_topk_sparse_decoder_gives_the_dense_loss_and_gradients(tiny_config, kind):
    cfg = tiny_config
    cfg.sae.update(kind=kind, width=M, k=8, aux_k=16, dead_window_tokens=1)
    results = {}
    for mode in ("off", "on"):
        cfg.sae.sparse = mode
        k = jumprelu.core.kinds.from_config(cfg.sae, D)
        assert k.model.sparse_decoder == (mode == "on")
        params = k.model.init(jax.random.key(0), jnp.zeros((2, D)))["params"]
        stats = k.init_stats()
        stats["tokens_since_fired"] = jnp.where(jnp.arange(M) % 4 == 0, 10**6, 0).astype(jnp.int32)  # AuxK on
        x = 2.0 * jax.random.normal(jax.random.key(1), (B, D))
        fn = jax.jit(jax.value_and_grad(lambda p, k=k, s=stats, x=x: k.loss(k.model, p, s, x, 0.0), has_aux=True))
        results[mode] = fn(params)
    (v_d, (m_d, s_d)), g_d = results["off"]
    (v_s, (m_s, s_s)), g_s = results["on"]
    assert float(m_d["aux_loss"]) > 0
    _assert_same_loss(results["on"], results["off"], stats_rtol=1e-6)


def test_topk_sparse_decoder_trains_sharded_like_dense(tmp_path, tiny_config):
    cfg = tiny_config
    cfg.sae.update(kind="topk", k=4)
    cfg.train.steps = 20
    cfg.mesh.data, cfg.mesh.model = 2, 4
    results = _train_dense_and_sparse(cfg, tmp_path)
    for key, v in results["off"].items():
        np.testing.assert_allclose(results["on"][key], v, rtol=2e-4, atol=2e-5, err_msg=key)
