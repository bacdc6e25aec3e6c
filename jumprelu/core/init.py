"""Initialisation from a sample of training rows (normalised scale), applied once at the start.

b_dec      "zeros" (paper), "mean" or "median" (geometric, Weiszfeld) of the sample: with the
           pre-encoder bias the encoder then sees centred inputs from the first step
threshold  "constant" (paper: every θ_i = threshold_init), or set from the sample's
           pre-activations so the initial L0 is the target T: "latent_quantile" gives each
           latent the (1 - T/M) quantile of its own z (every latent fires on T/M of tokens),
           "global_quantile" one θ for all (the (1 - T/M) quantile of all z)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jumprelu.errors import ConfigError

B_DEC_INITS = ("zeros", "mean", "median")
THRESHOLD_INITS = ("constant", "latent_quantile", "global_quantile")
MIN_THRESHOLD = 1e-4  # a quantile at or below 0 would make the jump a leak of negative z
SLICE_ENTRIES = 1 << 24  # pre-activations computed at once: [rows, latents] slices of this size


def geometric_median(x: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Weiszfeld's iteration from the mean. x: [N, d] -> [d]."""
    m = x.mean(axis=0)
    for _ in range(iterations):
        w = 1.0 / np.maximum(np.linalg.norm(x - m, axis=1), 1e-8)
        m = (w[:, None] * x).sum(axis=0) / w.sum()
    return m


def decoder_bias(x: np.ndarray, how: str) -> np.ndarray:
    """b_dec from rows x: [N, d] (float64 arithmetic, float32 result)."""
    x = np.asarray(x, np.float64)
    if how == "zeros":
        return np.zeros(x.shape[1], np.float32)
    if how == "mean":
        return x.mean(axis=0).astype(np.float32)
    if how == "median":
        return geometric_median(x).astype(np.float32)
    raise ValueError(f"config field sae.b_dec_init must be one of {B_DEC_INITS}, found {how!r}")


def thresholds(z: np.ndarray, how: str, target_l0: float, width: int | None = None) -> np.ndarray:
    """θ for the latents of z: [N, m] so that each fires on target_l0 / width of these rows.

    width: the SAE's M when z holds only a slice of its latents (default: z's m).
    """
    n, m = z.shape
    q = 1.0 - min(max(target_l0 / (width or m), 0.0), 1.0)
    if how == "latent_quantile":
        theta = np.quantile(z, q, axis=0)
    elif how == "global_quantile":
        theta = np.full(m, np.quantile(z, q))
    else:
        raise ValueError(f"config field sae.threshold_init_mode must be one of {THRESHOLD_INITS}, found {how!r}")
    return np.maximum(theta, MIN_THRESHOLD).astype(np.float32)


def needs_data(s) -> bool:
    """Whether the start of training needs a sample of rows (data-dependent init or bandwidth, or
    the held-out rows the target-L0 controller reads)."""
    return (
        s.get("b_dec_init", "zeros") != "zeros"
        or s.get("threshold_init_mode", "constant") != "constant"
        or s.get("bandwidth_mode", "absolute") == "relative"
        or (bool(s.get("target_l0_held_out_rows")) and s.get("target_l0") is not None)
    )


def controller_pick(available: int, count: int) -> np.ndarray:
    """Which of the `available` held-out rows the target-L0 controller reads: `count` of them spread
    evenly over the split (the on-the-fly LM's held-out rows come in text order), sorted, distinct."""
    if not count:
        return np.zeros(0, np.int64)
    return np.linspace(0, available - 1, count).round().astype(np.int64)


def report_rows(rows: np.ndarray, controller_count: int, split_rows: int | None = None) -> np.ndarray:
    """The held-out rows a report may be measured on: all but those the controller read.

    split_rows: data.eval_rows when the run trained (the split's rows are a prefix of a larger
    split's, so the controller's rows are found again when `rows` was read with another count)."""
    if not controller_count:
        return rows
    picked = controller_pick(len(rows) if split_rows is None else split_rows, controller_count)
    keep = np.ones(len(rows), bool)
    keep[picked[picked < len(rows)]] = False
    return rows[keep]


def start_from_data(params: dict, stats: dict, x, s, held_out=None) -> tuple[dict, dict]:
    """Sets b_dec, θ and the bandwidth scale from rows x: [N, d_model] (normalised), once at step 0,
    and the controller's held-out rows from held_out: [≥ sae.target_l0_held_out_rows, d_model]
    (normalised; rows never trained on).

    The pre-activations are computed in slices of latents so a wide SAE needs no [N, M] array.
    """
    x = np.asarray(x, np.float32)
    params, stats = dict(params), dict(stats)
    if "held_out_rows" in stats:
        n = stats["held_out_rows"].shape[0]
        found = 0 if held_out is None else len(held_out)
        if found < n:
            raise ConfigError(
                f"config field sae.target_l0_held_out_rows={n} needs as many held-out rows (data.eval_rows), "
                f"found {found}"
            )
        stats["held_out_rows"] = jnp.asarray(np.asarray(held_out, np.float32)[controller_pick(found, n)])
    b_dec = decoder_bias(x, s.b_dec_init)
    params["b_dec"] = jnp.asarray(b_dec)
    if s.threshold_init_mode == "constant" and "z_scale" not in stats:
        return params, stats  # nothing below is needed: no pre-activations
    centred = jnp.asarray(x - b_dec if s.pre_encoder_bias else x)
    w_enc, b_enc = params["W_enc"], params["b_enc"]
    width, mode = w_enc.shape[1], s.threshold_init_mode
    step = max(1, SLICE_ENTRIES // max(x.shape[0], 1))
    global_rows = max(1, SLICE_ENTRIES // width)  # the rows "global_quantile" pools over every latent
    thetas, spreads, pooled = [], [], []
    for lo in range(0, width, step):
        z = np.asarray(centred @ w_enc[:, lo : lo + step] + b_enc[lo : lo + step])
        spreads.append(z.std(axis=0))
        if mode == "latent_quantile":
            thetas.append(thresholds(z, mode, s.target_l0, width))
        elif mode == "global_quantile":
            pooled.append(z[:global_rows])
    if mode == "global_quantile":
        thetas = [thresholds(np.concatenate(pooled, axis=1), mode, s.target_l0)]
    if thetas:
        theta = jnp.asarray(np.concatenate(thetas))
        key = "log_threshold" if "log_threshold" in params else "threshold"
        params[key] = jnp.log(theta) if key == "log_threshold" else theta
    if "z_scale" in stats:
        stats["z_scale"] = jnp.asarray(np.median(np.concatenate(spreads)), jnp.float32)
    return params, stats
