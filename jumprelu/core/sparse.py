"""The sparse JumpReLU SAE forward and backward: one dense product plus O(B·L0·d).

JumpReLU's derivative with respect to z is H(z - θ) and its θ pseudo-derivative lives in the
kernel window |z - θ| < ε/2, so apart from the encoder product z = x W_enc every term of the
step touches only the entries of z above θ - ε/2: the active latents and the lower half of
the window. `sparse_forward` computes z densely in row blocks (no [B, M] array outlives its
block), keeps each row's first candidates (`Capacity.per_row` slots, found from a bit-packed mask), compacts them
into one list of (row, latent, z) entries for the batch, and from the entries alone computes

  forward   x̂_b = Σ_e f_e W_dec[i_e] + b_dec      l0_b = Σ_e H_e      counts_i, f_sum_i
  backward  ∂f_e = ∂x̂_b · W_dec[i_e] + ∂f_sum_i      (a sampled dense-dense product)
            ∂z_e = H_e · ∂f_e                        (∂z is zero off the active set)
            ∂W_dec[i] += f_e ∂x̂_b,  ∂W_enc[:, i] += x_b ∂z_e   (segment sums by latent)
            ∂θ_i += K((z_e-θ_i)/ε) · (-(θ_i/ε) ∂f_e - (∂l0_b + ∂counts_i)/ε)

with exactly the pseudo-derivatives of `ops.jumprelu_l0` / `ops.heaviside`, so the numbers are
those of the dense step. Rows with more candidates than their slots (the heavy tail of the
per-row L0) are spilled: up to `Capacity.spill` of them are computed densely beside the
entries. A batch beyond the capacity (more such rows, or more entries than
`Capacity.per_batch`) takes the dense computation for that step (`overflow` = 1: the step's
`sparse_step` metric is 0, and the loop logs its share over each log interval); nothing is
ever truncated. Per-latent outputs are sums over the batch (counts, f_sum), which is all the JumpReLU losses need
(`kinds/jumprelu.make_loss`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jumprelu.core import ops, sparse_index
from jumprelu.core.dense_blocks import (
    blocked,
    dense_forward,
    dense_grads_in_blocks,
    dense_in_blocks,
    pre_acts,
    row_blocks,
    window_coord,
)
from jumprelu.core.sparse_sizes import Capacity, default_capacity

__all__ = ["Capacity", "default_capacity", "sparse_forward", "dense_forward", "row_blocks"]

_CHUNK = 4096  # entries per chunk of the gathers and scatter-adds


def _as_operand(a, dtype):
    """a as a matmul operand of `dtype` (rounded to it), in float32: products of such operands are
    exact in float32, as in the dense matmuls' float32 accumulation."""
    return a.astype(dtype).astype(jnp.float32)


def _candidates(x, w_enc, bias, theta, eps, row_capacity, dtype):
    """Per row, the (value, latent) of up to `row_capacity` entries with z > θ - ε/2 (unused
    slots -inf; a row with more keeps its first ones by latent) and how many candidates the
    row had. z exists one row block at a time."""
    n = row_blocks(x.shape[0])

    def blk(x_blk):
        z = pre_acts(x_blk, w_enc, bias, dtype)
        idx, count = sparse_index.first_set(window_coord(z, theta, eps) > -0.5, row_capacity)
        used = jnp.arange(row_capacity) < count[:, None]
        return jnp.where(used, jnp.take_along_axis(z, idx, axis=1), -jnp.inf), idx, count

    if n == 1:
        return blk(x)
    vals, idx, count = jax.lax.map(blk, blocked(n, x)[0])
    return vals.reshape(-1, row_capacity), idx.reshape(-1, row_capacity), count.reshape(-1)


def _select(x, w_enc, bias, theta, eps, cap: Capacity, dtype):
    """The entries: (rows, latents, z values) [per_batch], their count, the spill rows [spill]
    (padded with B) and whether the batch overflows."""
    batch = x.shape[0]
    vals, idx, count = _candidates(x, w_enc, bias, theta, eps, cap.per_row, dtype)
    over = count > cap.per_row
    spill = jnp.nonzero(over, size=cap.spill, fill_value=batch)[0]
    per_row = jnp.where(over, 0, count)  # a row's candidates fill its first slots
    ends = jnp.cumsum(per_row)
    kept = ends[-1]
    overflow = (jnp.sum(over) > cap.spill) | (kept > cap.per_batch)
    size = _chunk_size(cap.per_batch)
    total = size * math.ceil(cap.per_batch / size)  # whole chunks
    # Entry e belongs to the row whose slot range holds it: rows ascend, and the padding past
    # `kept` takes the last row, which keeps them ascending.
    e = jnp.arange(total, dtype=ends.dtype)
    rows = jnp.minimum(jnp.searchsorted(ends, e, side="right", method="scan_unrolled"), batch - 1)
    slots = jnp.clip(e - (ends[rows] - per_row[rows]), 0, cap.per_row - 1)
    valid = e < kept
    z = jnp.where(valid, vals[rows, slots], -jnp.inf)
    return (rows, idx[rows, slots], z, jnp.minimum(kept, cap.per_batch)), spill, overflow


def _entries(z, lat, theta, eps):
    """Masks and values of the kept entries: active (z > θ), window (|z - θ| < ε/2), f."""
    th = theta[lat]
    valid = z > -jnp.inf
    z = jnp.where(valid, z, 0.0)
    u = window_coord(z, th, eps)
    active = valid & (z > th)
    window = valid & (u > -0.5) & (u < 0.5)
    return th, active, window, jnp.where(active, z, 0.0)


def _scatter_sum(idx, values, width):
    return jnp.zeros((width,), values.dtype).at[idx].add(values, mode="promise_in_bounds")


def _dense_rows(xs, row_mask, w_enc, bias, theta, w_dec, eps, dtype):
    """The spill rows computed densely: (x̂ - b_dec [R, d], l0 [R], counts [M], f_sum [M]),
    padding rows (row_mask False) contributing nothing."""
    z = pre_acts(xs, w_enc, bias, dtype)
    f, l0 = ops.jumprelu_l0(z, theta, eps)
    m = row_mask.astype(jnp.float32)
    f = f * m[:, None]
    counts = jnp.sum(ops.heaviside(z, theta, eps) * m[:, None], axis=0)
    x_hat = jnp.matmul(f.astype(dtype), w_dec.astype(dtype), preferred_element_type=jnp.float32)
    return x_hat, l0 * m, counts, jnp.sum(f, axis=0)


def _spill_inputs(x, spill):
    return x.at[spill].get(mode="fill", fill_value=0.0), spill < x.shape[0]


def _over_spill_rows(mask, compute):
    """compute(n) for the smallest n in (0, spill/4, spill) that holds the batch's spill rows.

    The spill rows' dense products span the full width (three of them per row, ~15% of the
    step at width 64K with 64 slots), and most batches spill few rows or none; `nonzero` puts
    the spilled rows first, so the first n slots hold them all and the rest are padding,
    whose contributions are exactly zero."""
    slots = mask.shape[0]
    sizes = sorted({0, max(1, slots // 4), slots})
    branch = jnp.searchsorted(jnp.asarray(sizes), jnp.sum(mask), side="left")
    return jax.lax.switch(branch, [functools.partial(compute, n) for n in sizes])


def _chunk_size(total: int) -> int:
    return min(_CHUNK, total)


def _over_chunks(used, total: int, body, init):
    """fori_loop of body(start, carry) over the chunks [start, start + chunk) of the first `used`
    of `total` entries (total a multiple of the chunk): padding beyond `used` costs nothing, and
    each chunk's [chunk, d] temporaries stay in cache."""
    size = _chunk_size(total)
    chunks = jnp.minimum((used + size - 1) // size, total // size)
    return jax.lax.fori_loop(0, chunks, lambda c, carry: body(c * size, carry), init)


def _chunk(start, total: int, *arrays):
    return [jax.lax.dynamic_slice_in_dim(a, start, _chunk_size(total)) for a in arrays]


def _sparse_outputs(x, entries, spill, theta, w_enc, bias, w_dec, b_dec, eps, dtype):
    batch, width = x.shape[0], w_dec.shape[0]
    rows, lat, z, used = entries
    _, active, _, f = _entries(z, lat, theta, eps)

    def decode(start, x_hat):
        r, i, f_c = _chunk(start, z.shape[0], rows, lat, f)
        w_rows = _as_operand(w_dec.at[i].get(mode="promise_in_bounds"), dtype)  # [chunk, d]
        contrib = _as_operand(f_c, dtype)[:, None] * w_rows
        return x_hat.at[r].add(contrib, indices_are_sorted=True, mode="promise_in_bounds")

    x_hat = _over_chunks(used, z.shape[0], decode, jnp.zeros((batch, w_dec.shape[1]), jnp.float32)) + b_dec
    active_f = active.astype(jnp.float32)
    l0 = jax.ops.segment_sum(active_f, rows, batch, indices_are_sorted=True)
    counts, f_sum = _scatter_sum(lat, active_f, width), _scatter_sum(lat, f, width)
    xs, mask = _spill_inputs(x, spill)

    def spilled(n):  # the first n slots densely, the padding after them zero
        if n == 0:
            f32 = jnp.float32
            return jnp.zeros(xs.shape, f32), jnp.zeros(xs.shape[:1], f32), jnp.zeros(width, f32), jnp.zeros(width, f32)
        s_xhat, s_l0, counts, f_sum = _dense_rows(xs[:n], mask[:n], w_enc, bias, theta, w_dec, eps, dtype)
        pad = xs.shape[0] - n
        return jnp.pad(s_xhat, ((0, pad), (0, 0))), jnp.pad(s_l0, (0, pad)), counts, f_sum

    s_xhat, s_l0, s_counts, s_fsum = _over_spill_rows(mask, spilled)
    x_hat = x_hat.at[spill].add(s_xhat, mode="drop")
    l0 = l0.at[spill].add(s_l0, mode="drop")
    return x_hat, l0, counts + s_counts, f_sum + s_fsum


def _sparse_grads(x, entries, spill, theta, w_enc, bias, w_dec, eps, dtype, g_xhat, g_l0, g_counts, g_fsum):
    """(∂W_enc, ∂bias, ∂θ, ∂W_dec, ∂b_dec) from the kept entries plus the spill rows' dense vjp."""
    width, d = w_dec.shape
    rows, lat, z, used = entries
    total = z.shape[0]
    # One pass over the entries sorted by latent (scatter-adds into sorted rows are several
    # times faster on XLA:CPU, and W_dec's rows are then read in order), padding last, dropped.
    order, s_lat = sparse_index.by_latent(lat, jnp.arange(total) < used, width, _CHUNK)
    s_rows, s_z = rows[order], z[order]
    # The dense ∂W_dec = fᵀ ∂x̂, ∂f = ∂x̂ W_decᵀ and ∂W_enc = xᵀ ∂z multiply operands rounded to
    # the matmul dtype.
    x_in, g_in = _as_operand(x, dtype), _as_operand(g_xhat, dtype)

    def body(start, acc):
        d_wdec, d_wenc_t, d_bias, d_theta = acc
        i, r, z_c = _chunk(start, total, s_lat, s_rows, s_z)
        th, active, window, f = _entries(z_c, i, theta, eps)
        g_rows = g_in.at[r].get(mode="promise_in_bounds")
        w_rows = _as_operand(w_dec.at[i].get(mode="fill", fill_value=0.0), dtype)
        # ∂f_e = ∂x̂_b · W_dec[i]: a sampled dense-dense product
        g_f = jnp.sum(g_rows * w_rows, axis=-1) + g_fsum.at[i].get(mode="fill", fill_value=0.0)
        g_z = jnp.where(active, g_f, 0.0)
        g_th = jnp.where(
            window, -(th / eps) * g_f - (g_l0[r] + g_counts.at[i].get(mode="fill", fill_value=0.0)) / eps, 0.0
        )
        f_op, gz_op = _as_operand(f, dtype), _as_operand(g_z, dtype)
        d_wdec = d_wdec.at[i].add(f_op[:, None] * g_rows, indices_are_sorted=True, mode="drop")
        d_wenc_t = d_wenc_t.at[i].add(
            gz_op[:, None] * x_in.at[r].get(mode="promise_in_bounds"), indices_are_sorted=True, mode="drop"
        )
        d_bias = d_bias.at[i].add(g_z, indices_are_sorted=True, mode="drop")
        d_theta = d_theta.at[i].add(g_th, indices_are_sorted=True, mode="drop")
        return d_wdec, d_wenc_t, d_bias, d_theta

    zeros = jnp.zeros((width, d), jnp.float32)
    vec = jnp.zeros((width,), jnp.float32)
    d_wdec, d_wenc_t, d_bias, d_theta = _over_chunks(used, total, body, (zeros, zeros, vec, vec))
    xs, mask = _spill_inputs(x, spill)

    def spilled(n):  # the vjp of the first n slots (padding rows' vjp is exactly zero)
        if n == 0:
            return jnp.zeros_like(w_enc), jnp.zeros_like(bias), jnp.zeros_like(theta), jnp.zeros_like(w_dec)
        _, vjp = jax.vjp(lambda *p: _dense_rows(xs[:n], mask[:n], *p, eps, dtype), w_enc, bias, theta, w_dec)
        rows = spill[:n]
        gs = (g_xhat.at[rows].get(mode="fill", fill_value=0.0), g_l0.at[rows].get(mode="fill", fill_value=0.0))
        return vjp((*gs, g_counts, g_fsum))

    s_wenc, s_bias, s_theta, s_wdec = _over_spill_rows(mask, spilled)
    return d_wenc_t.T + s_wenc, d_bias + s_bias, d_theta + s_theta, d_wdec + s_wdec, jnp.sum(g_xhat, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def sparse_forward(x, w_enc, bias, theta, w_dec, b_dec, eps, capacity: Capacity, dtype=jnp.float32):
    """(x̂ [B, d], l0 [B], counts [M], f_sum [M], overflow []) with the dense step's gradients.

    x: [B, d]; w_enc: [d, M]; bias: [M] (b_enc - b_dec W_enc, so ∂b_dec flows through it);
    theta: [M]; w_dec: [M, d]; b_dec: [d]; eps: [] (ε, may be traced); capacity: the static
    sizes (`Capacity`); dtype: of the matmuls. counts_i = Σ_b H(z_bi - θ_i) and f_sum_i = Σ_b f_bi
    carry the straight-through θ-gradient like `ops.heaviside` / `ops.jumprelu`. overflow is
    1.0 when the batch did not fit `capacity` and every output came from `dense_forward`.
    """
    return _forward(x, w_enc, bias, theta, w_dec, b_dec, eps, capacity, dtype)[0]


def _forward(x, w_enc, bias, theta, w_dec, b_dec, eps, capacity, dtype):
    entries, spill, overflow = _select(x, w_enc, bias, theta, eps, capacity, dtype)
    outs = jax.lax.cond(
        overflow,
        lambda: dense_in_blocks(x, w_enc, bias, theta, w_dec, b_dec, eps, dtype),
        lambda: _sparse_outputs(x, entries, spill, theta, w_enc, bias, w_dec, b_dec, eps, dtype),
    )
    res = (x, w_enc, bias, theta, w_dec, b_dec, eps, entries, spill, overflow)
    return (*outs, overflow.astype(jnp.float32)), res


def _bwd(capacity, dtype, res, g):
    x, w_enc, bias, theta, w_dec, b_dec, eps, entries, spill, overflow = res
    g_xhat, g_l0, g_counts, g_fsum, _ = g

    def dense():
        params = (w_enc, bias, theta, w_dec, b_dec)
        return dense_grads_in_blocks(x, params, eps, dtype, g_xhat, g_l0, g_counts, g_fsum)

    def sparse():
        grads = (g_xhat, g_l0, g_counts, g_fsum)
        return _sparse_grads(x, entries, spill, theta, w_enc, bias, w_dec, eps, dtype, *grads)

    d_wenc, d_bias, d_theta, d_wdec, d_bdec = jax.lax.cond(overflow, dense, sparse)
    # x is data (no gradient is used); ε is a hyperparameter.
    return jnp.zeros_like(x), d_wenc, d_bias, d_theta.astype(theta.dtype), d_wdec, d_bdec, jnp.zeros_like(eps)


sparse_forward.defvjp(_forward, _bwd)  # _forward: (outputs, residuals), the primal's signature


def z_variance(x, w_enc):
    """The variance over the batch of each latent's pre-activation [M] without forming z: w_iᵀ Cov(x)
    w_i from the centred [d, d] Gram matrix (d/B of one batch product; the bias cancels).
    Statistics only (no gradient)."""
    x, w = jax.lax.stop_gradient(x), jax.lax.stop_gradient(w_enc)
    xc = x - jnp.mean(x, axis=0)
    cov = jnp.matmul(xc.T, xc, precision=jax.lax.Precision.HIGHEST) / x.shape[0]
    return jnp.maximum(jnp.sum(w * jnp.matmul(cov, w, precision=jax.lax.Precision.HIGHEST), axis=0), 0.0)
