"""The straight-through pseudo-derivatives against the METHOD.md formulas, by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jumprelu.core.ops import fired_per_latent, heaviside, jumprelu, jumprelu_l0, jumprelu_l0_ste_z, rectangle

# θ = 1, ε = 0.5: the kernel window is the open interval (0.75, 1.25). Every value is
# exactly representable, so the points on the window's edges are exactly on them.
EPS = 0.5
THETA = np.array([1.0, 1.0, 1.0, 2.0], np.float32)
Z_VALUES = [0.5, 0.75, 0.875, 1.0, 1.125, 1.25, 2.0]  # outside, edge, in, in, in, edge, outside


def hand_kernel(u):
    return 1.0 if -0.5 < u < 0.5 else 0.0


def hand_grads(z, theta, g, fn):
    """Loops over every element: (dL/dz, dL/dθ) from the formulas, summed by hand."""
    gz, gth = np.zeros_like(z), np.zeros_like(theta)
    for idx in np.ndindex(z.shape):
        i = idx[-1]
        k = hand_kernel((z[idx] - theta[i]) / EPS)
        if fn == "jumprelu":
            gz[idx] = g[idx] * (1.0 if z[idx] > theta[i] else 0.0)
            gth[i] += g[idx] * -(theta[i] / EPS) * k
        else:
            gth[i] += g[idx] * -(1.0 / EPS) * k
    return gz, gth


@pytest.mark.parametrize("lead_shape", [(7,), (3, 7), (2, 3, 7)])
@pytest.mark.parametrize("fn_name", ["jumprelu", "heaviside"])
def test_pseudo_derivatives_match_hand_formulas(lead_shape, fn_name):
    rng = np.random.default_rng(0)
    shape = lead_shape + (4,)
    z = rng.choice(np.array(Z_VALUES + [v + 1.0 for v in Z_VALUES], np.float32), size=shape)
    g = rng.standard_normal(shape).astype(np.float32)
    fn = {"jumprelu": jumprelu, "heaviside": heaviside}[fn_name]

    gz, gth = jax.grad(lambda z_, t_: jnp.sum(fn(z_, t_, EPS) * g), argnums=(0, 1))(z, THETA)
    want_gz, want_gth = hand_grads(z, THETA, g, fn_name)

    assert gth.shape == THETA.shape  # summed over every leading axis, and only those
    np.testing.assert_allclose(np.asarray(gth), want_gth, rtol=1e-6, atol=1e-6)
    if fn_name == "heaviside":
        assert np.all(np.asarray(gz) == 0.0)  # exactly zero, not merely small
    else:
        np.testing.assert_array_equal(np.asarray(gz), want_gz)


def test_window_edges_are_excluded_and_interior_included():
    z = np.array(Z_VALUES, np.float32)[:, None]  # [7, 1]
    theta = np.array([1.0], np.float32)
    per_point = jax.vmap(jax.grad(lambda z_, t_: heaviside(z_, t_, EPS).sum(), argnums=1), in_axes=(0, None))(z, theta)
    np.testing.assert_array_equal(np.asarray(per_point)[:, 0], [0, 0, -2, -2, -2, 0, 0])


def test_forward_values():
    z = jnp.array([[0.5, 1.0, 1.5, 3.0]])
    theta = jnp.array([1.0, 1.0, 1.0, 2.0])
    np.testing.assert_array_equal(jumprelu(z, theta, EPS), [[0.0, 0.0, 1.5, 3.0]])
    np.testing.assert_array_equal(heaviside(z, theta, EPS), [[0.0, 0.0, 1.0, 1.0]])
    np.testing.assert_array_equal(rectangle(jnp.array([-0.5, -0.49, 0.0, 0.49, 0.5])), [0, 1, 1, 1, 0])


def test_jit_and_vmap_agree_with_eager():
    rng = np.random.default_rng(1)
    z = rng.uniform(0.5, 1.5, (5, 6, 4)).astype(np.float32)
    theta = np.array([1.0, 0.9, 1.1, 1.0], np.float32)

    def loss(z_, t_):
        return jnp.sum(jumprelu(z_, t_, EPS) ** 2) + jnp.sum(heaviside(z_, t_, EPS))

    eager = jax.grad(loss, argnums=1)(z, theta)
    jitted = jax.jit(jax.grad(loss, argnums=1))(z, theta)
    # vmap over the leading axis, then sum: the per-example θ cotangents add up.
    mapped = jax.vmap(jax.grad(loss, argnums=1), in_axes=(0, None))(z, theta).sum(0)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    np.testing.assert_allclose(mapped, eager, rtol=1e-5)
    # vmap over stacked thresholds too (one θ per SAE in a stack).
    stacked = jax.vmap(jax.grad(loss, argnums=1))(z, np.stack([theta] * 5))
    assert stacked.shape == (5, 4)


def test_threshold_cotangent_keeps_float32_with_bf16_inputs():
    z = jnp.ones((3, 4), jnp.bfloat16)
    theta = jnp.full((4,), 1.0, jnp.float32)
    g = jax.grad(lambda t: jnp.sum(jumprelu(z, t, EPS).astype(jnp.float32)))(theta)
    assert g.dtype == jnp.float32


@pytest.mark.parametrize("rows", [6, 1024])  # 1024 rows takes the chunked path on CPU
def test_fused_jumprelu_l0_matches_the_separate_ops(rows):
    rng = np.random.default_rng(2)
    z = rng.choice(np.array(Z_VALUES, np.float32), size=(rows, 4)) + rng.uniform(-0.3, 0.3, (rows, 4)).astype(
        np.float32
    )
    g = rng.standard_normal((rows, 4)).astype(np.float32)
    lam = 0.3

    def fused(z_, t_):
        f, l0 = jumprelu_l0(z_, t_, EPS)
        return jnp.sum(f * g) + lam * jnp.sum(l0)

    def separate(z_, t_):
        return jnp.sum(jumprelu(z_, t_, EPS) * g) + lam * jnp.sum(heaviside(z_, t_, EPS))

    got = jax.jit(jax.grad(fused, argnums=(0, 1)))(z, THETA)
    want = jax.grad(separate, argnums=(0, 1))(z, THETA)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-4)
    f, l0 = jumprelu_l0(z, THETA, EPS)
    np.testing.assert_array_equal(l0, (z > THETA).sum(-1))
    np.testing.assert_array_equal(fired_per_latent(z, THETA), (z > THETA).sum(0))


def test_chunked_theta_cotangent_matches_hand_sum():
    """The chunked CPU reduction (rows a multiple of 256) gives the hand-summed answer."""
    rng = np.random.default_rng(3)
    z = rng.choice(np.array(Z_VALUES, np.float32), size=(2, 512, 4))
    g = rng.standard_normal((2, 512, 4)).astype(np.float32)
    gth = jax.grad(lambda t: jnp.sum(jumprelu(z, t, EPS) * g))(THETA)
    _, want = hand_grads(z, THETA, g, "jumprelu")
    np.testing.assert_allclose(gth, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [6, 1024])  # 1024 rows takes the chunked path on CPU
def test_ste_to_pre_activations_adds_the_negated_theta_terms_to_z(rows):
    """jumprelu_l0_ste_z: same values and θ-gradient as jumprelu_l0; z's gradient gains, inside
    the window, +(θ/ε)·∂f + (1/ε)·∂l0 (the jump differentiated in z), by hand element by element."""
    rng = np.random.default_rng(4)
    z = rng.choice(np.array(Z_VALUES, np.float32), size=(rows, 4))
    g = rng.standard_normal((rows, 4)).astype(np.float32)
    lam = 0.3

    def loss(op):
        def fn(z_, t_):
            f, l0 = op(z_, t_, EPS)
            return jnp.sum(f * g) + lam * jnp.sum(l0)

        return fn

    gz, gth = jax.jit(jax.grad(loss(jumprelu_l0_ste_z), argnums=(0, 1)))(z, THETA)
    _, gth_paper = jax.grad(loss(jumprelu_l0), argnums=(0, 1))(z, THETA)
    want = np.zeros_like(z)
    for b, i in np.ndindex(z.shape):
        k = hand_kernel((z[b, i] - THETA[i]) / EPS)
        want[b, i] = g[b, i] * (z[b, i] > THETA[i]) + k * (THETA[i] / EPS * g[b, i] + lam / EPS)
    np.testing.assert_allclose(gz, want, rtol=1e-6)
    np.testing.assert_allclose(gth, gth_paper, rtol=1e-6)
    assert np.any(want != g * (z > THETA))  # some rows sit in the window, so the test can fail
    for a, b in zip(jumprelu_l0_ste_z(z, THETA, EPS), jumprelu_l0(z, THETA, EPS), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fn", [jumprelu, heaviside, jumprelu_l0, jumprelu_l0_ste_z])
@pytest.mark.parametrize("eps", [0.0, -0.01, float("nan")])
def test_a_bandwidth_that_is_not_positive_is_refused_where_gradients_are_taken(fn, eps):
    """An audit: ε ≤ 0 gave NaN (0/0) or silently zero θ gradients; a traced ε is left to the config."""
    z, theta = jnp.array([[0.1, 0.5, 0.0]]), jnp.array([0.1, 0.2, 0.3])

    def loss(t, e):
        out = fn(z, t, e)
        return sum(jnp.sum(o) for o in jax.tree.leaves(out))

    with pytest.raises(ValueError, match=r"bandwidth must be a finite number > 0 \(the kernel's width ε\)"):
        jax.grad(loss)(theta, eps)
    with pytest.raises(ValueError, match="bandwidth must be"):
        jax.jit(jax.grad(lambda t: loss(t, eps)))(theta)
    assert np.isfinite(jax.grad(loss)(theta, 0.01)).all()
    jax.jit(jax.grad(loss))(theta, 0.01)
    jax.jit(jax.grad(loss))(theta, 0.0)  # a traced ε is left to the config's check: not an error here
