"""Evaluation on held-out activations: L0, FVU, and latent firing frequencies."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jumprelu.core import folded

# the fewest rows a report measures: FVU divides by their spread around their mean, which one row
# does not have (its FVU came out ~1e6-1e30)
MIN_ROWS = 2


@functools.partial(jax.jit, static_argnames="k")
def _chunk_stats(params: dict, x: jax.Array, k: int | None):
    f = folded.encode(params["W_enc"], params["b_enc"], params["threshold"], x, k)
    fired = (f != 0) & ~jnp.isnan(f)  # a NaN row (its FVU NaN) is not counted as firing every latent
    x_hat = folded.decode(params["W_dec"], params["b_dec"], f)
    return (
        jnp.sum(jnp.square(x - x_hat)),  # squared error
        jnp.sum(fired),  # active latents, summed over tokens
        jnp.sum(fired, axis=0),  # [M] firing counts
        jnp.sum(x, axis=0),  # [d] for the mean
        jnp.sum(jnp.square(x)),  # for the total variance
    )


def evaluate_rows(sae_params: dict, rows: np.ndarray, chunk_rows: int = 4096) -> dict:
    """Metrics of a folded SAE (raw units, see `jumprelu.core.folded`; TopK with `k`) on rows [N, d_model].

    Returns l0, fvu = E‖x - x̂‖² / E‖x - E[x]‖², the mean squared error per token, the
    share of dead latents (never fired here) and of dense ones (firing on > 10% of
    tokens), and per-latent firing frequencies.
    """
    n = rows.shape[0]
    if n == 0:  # (one row is measured too, e.g. one process's share of a sum; reports ask for MIN_ROWS)
        raise ValueError("cannot evaluate on zero rows")
    k = None if sae_params.get("k") is None else int(sae_params["k"])
    params = {name: jnp.asarray(sae_params[name], jnp.float32) for name in folded.FOLDED_KEYS}
    sq_err = active = sum_sq = 0.0
    counts = np.zeros(params["W_enc"].shape[1], np.int64)
    sum_x = np.zeros(params["W_enc"].shape[0], np.float64)
    for start in range(0, n, chunk_rows):
        x = jnp.asarray(rows[start : start + chunk_rows], jnp.float32)
        e, a, c, sx, sq = jax.device_get(_chunk_stats(params, x, k))
        sq_err += float(e)
        active += float(a)
        counts += c
        sum_x += sx
        sum_sq += float(sq)
    mean = sum_x / n
    total_var = sum_sq - n * float(mean @ mean)
    freq = counts / n
    return {
        "tokens": int(n),
        "l0": active / n,
        "mse": sq_err / n,
        "fvu": sq_err / max(total_var, 1e-30),
        "dead_fraction": float(np.mean(counts == 0)),
        "dense_fraction": float(np.mean(freq > 0.1)),
        "firing_frequency": freq,
    }


def prefix(sae_params: dict, width: int) -> dict:
    """A folded JumpReLU SAE cut to its first `width` latents. Each latent fires on its own, so the
    cut SAE's reconstruction is exactly the prefix a Matryoshka loss (`sae.matryoshka_widths`)
    trains; `evaluate_rows(prefix(p, m), rows)` is that prefix's L0 and FVU."""
    if sae_params.get("k") is not None:
        raise ValueError("a TopK SAE's prefix is not a sub-SAE (its top k are chosen over every latent)")
    cut = {name: sae_params[name] for name in folded.FOLDED_KEYS}
    cut.update(W_enc=cut["W_enc"][:, :width], b_enc=cut["b_enc"][:width], threshold=cut["threshold"][:width])
    cut["W_dec"] = cut["W_dec"][:width]
    return cut


def nested_prefixes(sae_config) -> tuple[tuple[int, float], ...]:
    """The (width, weight) pairs of the Matryoshka prefixes a run's SAE config (`sae`) trained, the
    last the whole SAE; () for a plain SAE. The nested loss is JumpReLU's (other kinds ignore the
    field); weights are as given (equal shares when none are)."""
    if sae_config.get("kind", "jumprelu") != "jumprelu":
        return ()
    widths = tuple(sae_config.get("matryoshka_widths", ()) or ())
    weights = tuple(sae_config.get("matryoshka_weights", ()) or ()) or (1.0,) * len(widths)
    return tuple(zip(widths, weights, strict=True))


def prefix_metrics(sae_params: dict, widths, rows) -> list[dict]:
    """Each prefix's held-out L0 and FVU (`prefix`), as `jumprelu evaluate` and `refit` report them."""
    cut = [(m, evaluate_rows(prefix(sae_params, m), rows)) for m in widths]
    return [dict(width=m, l0=c["l0"], fvu=c["fvu"]) for m, c in cut]
