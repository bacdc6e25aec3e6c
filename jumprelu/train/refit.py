"""Least-squares decoder refit: the W_dec and b_dec that best reconstruct given rows from the
SAE's own codes, with ridge regularisation. Which latents fire on which rows (every L0 and firing
frequency) stays exactly what training produced; the refitted rows are rescaled to unit norm,
their encoder columns and thresholds by the inverse (so a code is measured along its unit row).

At a short budget the trained decoder is far from the best one for its encoder's codes (on the
shared SmolLM2 activations, 500k tokens, L0 50: the plain least-squares decoder lowers FVU on
the rows it is fitted to by 12%), but rows seen many times are easy to over-fit, so the fit
carries a ridge penalty ρ · mean_i(Σ_b f_bi²) · ‖W_dec‖² (ρ = `ridge`, relative to the codes'
own scale, so one value serves any normalisation). Latents that never fire on the rows keep
their trained decoder rows. The normal equations need the [M+1, M+1] Gram matrix of the codes
(float64 on the host): widths up to `MAX_WIDTH`.

A Matryoshka SAE trains Σ_p w_p ‖x − f[:, :m_p] W_dec[:m_p] − b_dec‖² over its nested prefixes;
its refit minimises the same sum (`nested`), not the whole width's error alone, which would
give every prefix the decoder of the whole SAE. That sum's normal equations are the plain ones with
the Gram entry (i, j) weighted by s_max(i,j) and the cross row i by s_i, where s_i = Σ_{p: i < m_p}
w_p is the weight of the prefixes latent i is in (the bias is in all).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jumprelu.core import folded

MAX_WIDTH = 32768  # a [M+1]² float64 Gram matrix of 8 GiB
_WEIGHT_ROWS = 4096  # Gram rows weighted at a time (a [rows, M+1] float64 temporary)


@jax.jit
def _moments(w_enc, b_enc, threshold, x):
    """([f 1]ᵀ[f 1], [f 1]ᵀ x) of one chunk of raw rows: [M+1, M+1], [M+1, d]."""
    f = folded.encode(w_enc, b_enc, threshold, x)
    f1 = jnp.concatenate([f, jnp.ones((f.shape[0], 1), f.dtype)], axis=1)
    hi = jax.lax.Precision.HIGHEST
    return jnp.matmul(f1.T, f1, precision=hi), jnp.matmul(f1.T, x, precision=hi)


def prefix_weights(width: int, nested: Sequence[tuple[int, float]]) -> np.ndarray:
    """s: [width + 1], s_i = the summed weight of the nested prefixes (m_p, w_p) that hold latent i
    (the last entry is the bias, in every prefix); all ones without prefixes."""
    if not nested:
        return np.ones(width + 1)
    latents = np.arange(width + 1)
    s = sum(np.where(latents < m, float(w), 0.0) for m, w in nested)
    s[-1] = sum(float(w) for _, w in nested)
    return s


def refit_decoder(
    sae: folded.SAE, chunks: Iterable[np.ndarray], ridge: float, nested: Sequence[tuple[int, float]] = ()
) -> tuple[folded.SAE, int]:
    """(the SAE with the ridge least-squares W_dec and b_dec for `chunks` of raw rows, how many
    rows were used). The SAE is a folded JumpReLU-form SAE (not TopK); ridge ρ > 0. `nested`: a
    Matryoshka SAE's (prefix width, weight) pairs, whose weighted sum of errors is minimised."""
    width, d = sae.W_dec.shape
    if sae.k is not None:
        raise ValueError(f"the decoder refit takes JumpReLU-form SAEs; this one is TopK (k={sae.k})")
    if width > MAX_WIDTH:
        raise ValueError(f"the decoder refit holds an [M+1]² Gram matrix: width {width} > {MAX_WIDTH}")
    if not (math.isfinite(ridge) and ridge > 0):  # inf would zero every fired decoder row
        raise ValueError(
            f"ridge must be finite and > 0 (rows seen many times are over-fitted without it), found {ridge}"
        )
    gram, cross, rows = np.zeros((width + 1, width + 1)), np.zeros((width + 1, d)), 0
    for x in chunks:
        g, c = jax.device_get(_moments(sae.W_enc, sae.b_enc, sae.threshold, jnp.asarray(x, jnp.float32)))
        gram += g
        cross += c
        rows += x.shape[0]
    if rows == 0:
        raise ValueError("the decoder refit got no rows")
    s = prefix_weights(width, nested)
    # + the bias column, which always "fires"; a latent in no weighted prefix is not fitted either
    fired = np.append((np.diag(gram)[:width] > 0) & (s[:width] > 0), True)
    g, s = gram[np.ix_(fired, fired)], s[fired]
    if nested:  # entry (i, j) is in the prefixes holding both: s is non-increasing, so min(s_i, s_j)
        for a in range(0, len(s), _WEIGHT_ROWS):
            g[a : a + _WEIGHT_ROWS] *= np.minimum(s[a : a + _WEIGHT_ROWS, None], s[None, :])
    latents = np.arange(g.shape[0] - 1)
    g[latents, latents] += ridge * np.mean(np.diag(g)[:-1]) if len(latents) else 0.0
    solution = np.linalg.solve(g, cross[fired] * s[:, None])
    w_dec = np.array(sae.W_dec, np.float64)
    w_dec[fired[:-1]] = solution[:-1]
    # Unit-norm decoder rows, as training keeps them (SAEBench and Neuronpedia read a code as the
    # length along its row): latent i's row is divided by its norm n_i, and its pre-activation and
    # θ are multiplied by it, so the same latents fire and every reconstruction is unchanged.
    norms = np.linalg.norm(w_dec, axis=1)
    n = np.where(fired[:-1] & (norms > 0), norms, 1.0)
    refit = dataclasses.replace(
        sae,
        W_enc=jnp.asarray(np.asarray(sae.W_enc, np.float64) * n, jnp.float32),
        b_enc=jnp.asarray(np.asarray(sae.b_enc, np.float64) * n, jnp.float32),
        threshold=jnp.asarray(np.asarray(sae.threshold, np.float64) * n, jnp.float32),
        W_dec=jnp.asarray(w_dec / n[:, None], jnp.float32),
        b_dec=jnp.asarray(solution[-1], jnp.float32),
    )
    return refit, rows
