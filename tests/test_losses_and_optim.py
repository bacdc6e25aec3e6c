"""The loss by hand, the schedules at their landmarks, the decoder-norm handling."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jumprelu.config import base_config
from jumprelu.core.kinds.jumprelu import JumpReLUSAE
from jumprelu.core.kinds.jumprelu_loss import jumprelu_loss, make_loss
from jumprelu.core.sae import constrain
from jumprelu.train import optim
from jumprelu.train.state import init_state
from jumprelu.train.step import make_train_step


def test_loss_equals_hand_computation():
    model = JumpReLUSAE(d_model=2, width=3, bandwidth=0.5, threshold_param="raw", pre_encoder_bias=True)
    p = {
        "W_enc": jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]),
        "b_enc": jnp.array([0.0, -0.5, 0.0]),
        "threshold": jnp.array([0.5, 0.5, 1.5]),
        "W_dec": jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]),
        "b_dec": jnp.array([0.1, 0.0]),
    }
    x = jnp.array([[1.1, 2.0], [0.1, 0.0]])
    # Row 1: x - b_dec = [1, 2]; z = [1, 1.5, 3]; all above θ -> f = z;
    #   x̂ = [1 + 1.8, 1.5 + 2.4] + b_dec = [2.9, 3.9]; err = (1.1-2.9)² + (2-3.9)² = 3.24 + 3.61 = 6.85; L0 = 3.
    # Row 2: x - b_dec = [0, 0]; z = [0, -0.5, 0]; nothing fires; x̂ = b_dec = [0.1, 0]; err = 0; L0 = 0.
    lam = 0.2
    loss, m = jumprelu_loss(model, p, x, lam)
    np.testing.assert_allclose(loss, ((6.85 + lam * 3) + 0.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(m["mse"], 6.85 / 2, rtol=1e-6)
    np.testing.assert_allclose(m["l0"], 1.5)
    np.testing.assert_allclose(m["frac_fired"], 1.0)
    # FVU: total variance of x around its batch mean [0.6, 1.0]: 2·(0.5² + 1²) = 2.5.
    np.testing.assert_allclose(m["fvu"], 6.85 / 2.5, rtol=1e-6)


def test_learning_rate_schedule_landmarks():
    t = base_config().train
    lr = optim.learning_rate_schedule(t)
    np.testing.assert_allclose(lr(0), 0.1 * 7e-5, rtol=1e-6)
    np.testing.assert_allclose(lr(500), 0.55 * 7e-5, rtol=1e-6)  # half-way up the cosine
    np.testing.assert_allclose(lr(1000), 7e-5, rtol=1e-6)
    np.testing.assert_allclose(lr(50_000), 7e-5, rtol=1e-6)


def test_sparsity_schedule_landmarks():
    lam = optim.sparsity_schedule(base_config().train, 3.0)
    np.testing.assert_allclose([lam(0), lam(5000), lam(10_000), lam(40_000)], [0.0, 1.5, 3.0, 3.0], rtol=1e-6)


def test_adam_settings_are_the_papers():
    t = base_config().train
    assert (t.adam_b1, t.adam_b2, t.adam_eps, t.clip_grad_norm) == (0.0, 0.999, 1e-8, 0.0)


def test_projected_gradient_is_orthogonal_to_its_row():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((16, 8)) * 3.0, jnp.float32)
    g = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    proj = optim.project_decoder_gradient()
    out, _ = proj.update({"W_dec": g}, proj.init({"W_dec": w}), {"W_dec": w})
    cos = np.sum(np.asarray(out["W_dec"]) * np.asarray(w), axis=1)
    np.testing.assert_allclose(cos, 0.0, atol=1e-5)
    # Only the parallel part is removed: what is left is g minus its projection.
    w_hat = np.asarray(w) / np.linalg.norm(w, axis=1, keepdims=True)
    want = np.asarray(g) - np.sum(np.asarray(g) * w_hat, axis=1, keepdims=True) * w_hat
    np.testing.assert_allclose(out["W_dec"], want, atol=1e-6)


def test_decoder_rows_have_unit_norm_after_every_update():
    t = base_config().train
    t.lr, t.lr_warmup_steps = 1e-2, 0  # large steps: a missing renormalisation would show
    model = JumpReLUSAE(d_model=8, width=32, threshold_init=0.05)
    tx = optim.make_optimizer(t)
    state = init_state(model, tx, jax.random.key(0), 1.0)
    step_fn = jax.jit(
        make_train_step(model, tx, optim.linear_warmup(0.01, 0), optim.learning_rate_schedule(t), make_loss())
    )
    rng = np.random.default_rng(0)
    before = np.asarray(state.params["W_dec"])
    for _ in range(5):
        state, _ = step_fn(state, jnp.asarray(rng.standard_normal((64, 8)), jnp.float32))
        np.testing.assert_allclose(np.linalg.norm(state.params["W_dec"], axis=1), 1.0, rtol=1e-6)
    assert not np.allclose(before, state.params["W_dec"])  # it did train
    assert int(state.step) == 5


def test_constrain_is_idempotent_on_unit_rows():
    w = jnp.eye(4)
    np.testing.assert_array_equal(constrain({"W_dec": w})["W_dec"], w)


def test_optimizer_state_structure_is_adam():
    tx = optim.make_optimizer(base_config().train)
    state = tx.init({"W_dec": jnp.ones((2, 2))})
    assert any(isinstance(s, optax.ScaleByAdamState) for s in state)


def test_thresholds_own_adam_b2_moves_only_their_second_moment():
    """train.adam_b2_thresholds: θ's leaves follow Adam at that β2 and every other leaf Adam at
    train.adam_b2, step for step, in the same state structure (checkpoints stay interchangeable)."""
    rng = np.random.default_rng(0)
    params = {"W_enc": jnp.ones((3, 4)), "inner": {"threshold": jnp.ones((4,))}, "b_enc": jnp.zeros((4,))}
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(5)]
    apart = optim.scale_by_adam_thresholds_apart(0.0, 0.9, 0.999, 1e-8)
    fast, slow = optax.scale_by_adam(b1=0.0, b2=0.9, eps=1e-8), optax.scale_by_adam(b1=0.0, b2=0.999, eps=1e-8)
    states = [t.init(params) for t in (apart, fast, slow)]
    for g in grads:
        (u, sa), (uf, sf), (us, ss) = [t.update(g, s) for t, s in zip((apart, fast, slow), states, strict=True)]
        states = [sa, sf, ss]
        np.testing.assert_allclose(u["inner"]["threshold"], us["inner"]["threshold"], rtol=1e-6)
        for name in ("W_enc", "b_enc"):
            np.testing.assert_allclose(u[name], uf[name], rtol=1e-6)
    # (the first step is g/|g| at any β2, after its bias correction; by the fifth the two differ)
    assert not np.allclose(u["inner"]["threshold"], uf["inner"]["threshold"], rtol=1e-3)
    assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
    # unset (or equal to adam_b2), the optimizer is optax's own Adam, as before
    t = base_config().train
    t.adam_b2_thresholds = 0.999
    assert any(isinstance(s, optax.ScaleByAdamState) for s in optim.make_optimizer(t).init(params))
