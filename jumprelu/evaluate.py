"""Evaluation on held-out activations: L0, FVU, and latent firing frequencies."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jumprelu.fold import FOLDED_KEYS
from jumprelu.load import active_mask


@functools.partial(jax.jit, static_argnames="k")
def _chunk_stats(params: dict, x: jax.Array, k: int | None):
    z = x @ params["W_enc"] + params["b_enc"]
    fired = active_mask(z, params["threshold"], k)
    f = jnp.where(fired, z, 0.0)
    x_hat = f @ params["W_dec"] + params["b_dec"]
    return (
        jnp.sum(jnp.square(x - x_hat)),  # squared error
        jnp.sum(fired),  # active latents, summed over tokens
        jnp.sum(fired, axis=0),  # [M] firing counts
        jnp.sum(x, axis=0),  # [d] for the mean
        jnp.sum(jnp.square(x)),  # for the total variance
    )


def evaluate_rows(folded: dict, rows: np.ndarray, chunk_rows: int = 4096) -> dict:
    """Metrics of a folded SAE (raw units, see `jumprelu.fold`) on rows [N, d_model].

    Returns l0, fvu = E‖x - x̂‖² / E‖x - E[x]‖², the mean squared error per token, the
    share of dead latents (never fired here) and of dense ones (firing on > 10% of
    tokens), and per-latent firing frequencies.
    """
    n = rows.shape[0]
    if n == 0:
        raise ValueError("cannot evaluate on zero rows")
    k = None if folded.get("k") is None else int(folded["k"])
    params = {name: jnp.asarray(folded[name], jnp.float32) for name in FOLDED_KEYS}
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


def evaluate_workdir(workdir: str, member: int | None = None, eval_rows: int | None = None):
    """Stored-activation metrics of a trained SAE on its run's held-out split (same seed, same rows).

    Returns (sae, {"stored": metrics}, firing frequencies [width]).
    """
    import ml_collections

    from jumprelu import data as data_lib
    from jumprelu.load import load

    sae = load(workdir, member=member)
    cfg = ml_collections.ConfigDict(sae.config)
    if eval_rows is not None:
        cfg.data.eval_rows = eval_rows
    store = data_lib.open_source(cfg.data, workdir)
    rows = data_lib.make_stream(cfg.data, store).eval_set()
    folded = dict(sae.params(), k=sae.k)
    metrics = evaluate_rows(folded, rows)
    freq = metrics.pop("firing_frequency")
    return sae, {"source": cfg.data.source, "stored": metrics}, freq


def main(argv) -> None:
    """python -m jumprelu.evaluate --workdir RUN [--member i] [--eval_rows N] [--lm HARVEST_CONFIG]"""
    import io
    import json
    import sys

    from absl import logging

    from jumprelu import fs
    from jumprelu.checkpoint import member_dir
    from jumprelu.config import ConfigError
    from jumprelu.errors import DataError
    from jumprelu.metrics_log import atomic_write_text
    from jumprelu.plots import plot_firing_histogram

    del argv
    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
    workdir, member = _WORKDIR.value, _MEMBER.value
    out_dir = workdir if member is None else member_dir(workdir, member)
    try:
        sae, result, freq = evaluate_workdir(workdir, member, _EVAL_ROWS.value)
        if _LM.value is not None:
            from jumprelu.harvest import lm_eval  # imports gemma: only on this path

            result["lm"] = lm_eval.evaluate_lm(sae, _LM.value)
            freq = result["lm"].pop("firing_frequency")
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        print(f"jumprelu: error: {e}", file=sys.stderr)
        sys.exit(2)
    freq = np.asarray(freq)
    result.update(
        workdir=fs.abspath(out_dir),
        step=sae.step,
        dead_fraction=float(np.mean(freq == 0)),
        dense_fraction=float(np.mean(freq > 0.1)),
        frequencies_from="lm" if "lm" in result else "stored",
    )
    png = io.BytesIO()
    plot_firing_histogram(freq, png, title=f"step {sae.step}, {result['frequencies_from']} eval")
    fs.write_bytes_atomically(fs.join(out_dir, "firing_frequency.png"), png.getvalue())
    atomic_write_text(fs.join(out_dir, "eval.json"), json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"wrote {fs.join(out_dir, 'eval.json')} and firing_frequency.png")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir of the SAE.")
    _MEMBER = flags.DEFINE_integer("member", None, "Which SAE of a stacked run.")
    _EVAL_ROWS = flags.DEFINE_integer("eval_rows", None, "Held-out stored rows (default: the run's data.eval_rows).")
    _LM = config_flags.DEFINE_config_file("lm", None, "Harvest config of the language model: adds delta LM loss.")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
