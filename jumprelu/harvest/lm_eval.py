"""Delta LM loss: next-token cross-entropy with the SAE spliced into Gemma 2 at its site.

On held-out texts (the paper: 2,048 sequences × 1,024 tokens) this measures
  clean CE        the model as it is
  spliced CE      the site's activation replaced by the SAE's reconstruction
  zero-ablated CE the site's activation replaced by zeros
  delta LM loss = spliced − clean;  loss recovered = (zero − spliced) / (zero − clean)
and, on the same tokens' activations, L0, FVU and per-latent firing frequencies. Only
positions that are not BOS, EOS or padding are replaced and scored (Gemma Scope's convention:
the BOS activation is an outlier the SAE was never trained on); a prediction counts when its
input position is kept and its target is not padding.

With several processes (multi-host, as the harvest) every process loads the LM on its own
chips and scores every P-th sequence (`collect.host_sequences`); the sums behind every
metric are then added over processes, so the report is the one a single process computes
(up to float summation order), and every process returns it.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jumprelu.core import folded, layout
from jumprelu.errors import DataError
from jumprelu.evaluate.metrics import evaluate_rows
from jumprelu.harvest import collect as collect_lib
from jumprelu.harvest import gemma_model
from jumprelu.harvest import text as text_lib
from jumprelu.harvest.checks import EMPTY_EVAL_TEXTS


def sae_replace(k: int | None):
    """replace(keep [B, T], W_enc, b_enc, threshold, W_dec, b_dec, x [B, T, d]) -> x̂ at kept positions."""

    def replace(keep, w_enc, b_enc, threshold, w_dec, b_dec, x):
        x_hat = folded.decode(w_dec, b_dec, folded.encode(w_enc, b_enc, threshold, x, k))
        return jnp.where(keep[..., None], x_hat, x.astype(jnp.float32))

    return replace


def sae_shardings(mesh, width: int):
    """Shardings for (W_enc, b_enc, threshold, W_dec, b_dec): the training layout's
    (`jumprelu.core.layout`) on the LM's mesh, so each device holds 1/n of the SAE and of its
    [B, T, width] pre-activations (replicated, a 131K-wide SAE's weights alone are 3.8 GB per
    chip, and its pre-activations for 8 × 1,024 tokens another 4.3 GB); replicated when the
    device count does not divide the width."""
    from jax.sharding import NamedSharding

    if width % mesh.shape[layout.MODEL]:
        return (NamedSharding(mesh, layout.REPLICATED),) * len(folded.FOLDED_KEYS)
    return tuple(NamedSharding(mesh, layout.FOLDED_SPECS[name]) for name in folded.FOLDED_KEYS)


def zero_replace(keep, x):
    return jnp.where(keep[..., None], 0.0, x.astype(jnp.float32))


def evaluate_lm(sae, lm_cfg) -> dict:
    """Delta LM loss and activation metrics of `sae` (a jumprelu.SAE) at the site of `lm_cfg`."""
    from jumprelu.harvest.run import load_lm, start_processes

    if not lm_cfg.eval.texts:
        raise DataError(EMPTY_EVAL_TEXTS)
    process, processes = start_processes(lm_cfg)
    lm = load_lm(lm_cfg)
    tokenizer, model, (site,), mesh, params = lm.tokenizer, lm.model, lm.sites, lm.mesh, lm.params
    width = gemma_model.site_width(model.config, lm_cfg.site)
    if sae.d_model != width:
        raise DataError(f"the SAE takes d_model {sae.d_model} but site {site.name} of layer {site.layer} has {width}")
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    put = lambda a: jax.device_put(jnp.asarray(a), replicated)  # noqa: E731 -- same devices as the params
    clean_fn = gemma_model.token_losses(model)
    sae_fn = gemma_model.token_losses(model, site, sae_replace(sae.k))
    zero_fn = gemma_model.token_losses(model, site, zero_replace)
    acts_fn = gemma_model.site_fn(model, site)
    sae_arrays = tuple(getattr(sae, name) for name in folded.FOLDED_KEYS)
    sae_args = tuple(
        jax.device_put(jnp.asarray(v), s) for v, s in zip(sae_arrays, sae_shardings(mesh, sae.width), strict=True)
    )

    special = tokenizer.special
    paragraphs = bool(lm_cfg.get("split_paragraphs", False))  # as the harvest packed its texts
    seqs = text_lib.sequences(list(lm_cfg.eval.texts), tokenizer, lm_cfg.seq_len, lm_cfg.text_field, paragraphs)
    seqs = itertools.islice(seqs, lm_cfg.eval.sequences)
    seqs = collect_lib.host_sequences(seqs, process, processes, special)
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    scored, rows, sequences = 0, [], 0
    for _, tokens in text_lib.batches(seqs, lm_cfg.eval.batch_sequences, special):
        keep = text_lib.keep_mask(tokens, special)
        scores = keep[:, :-1] & (tokens[:, 1:] != special.pad)
        t, k = put(tokens), put(keep)
        for name, losses in (
            ("clean", clean_fn(params, t)),
            ("spliced", sae_fn(params, t, k, *sae_args)),
            ("zero", zero_fn(params, t, k)),
        ):
            sums[name] += float(np.sum(np.asarray(losses, np.float64)[scores]))
        scored += int(scores.sum())
        rows.append(np.asarray(acts_fn(params, t))[keep])
        sequences += int((tokens != special.pad).any(axis=1).sum())
    totals = _sum_over_processes(
        [sums["clean"], sums["spliced"], sums["zero"], scored, sequences],
        _row_sums(dict(sae.params(), k=sae.k), rows, sae.d_model, sae.width),
    )
    (clean, spliced, zero, scored, sequences), row_sums = totals
    if not scored:
        raise DataError(f"eval texts {list(lm_cfg.eval.texts)} gave no scorable tokens")
    ce = {"clean": clean / scored, "spliced": spliced / scored, "zero": zero / scored}
    stats = _row_metrics(row_sums)
    return {
        "sequences": int(sequences),
        "scored_tokens": int(scored),
        "ce_clean": ce["clean"],
        "ce_spliced": ce["spliced"],
        "ce_zero_ablated": ce["zero"],
        "delta_lm_loss": ce["spliced"] - ce["clean"],
        "loss_recovered": (ce["zero"] - ce["spliced"]) / (ce["zero"] - ce["clean"])
        if ce["zero"] != ce["clean"]
        else float("nan"),
        **{k: v for k, v in stats.items() if k != "firing_frequency"},
        "firing_frequency": stats["firing_frequency"],
    }


def _row_sums(sae_params: dict, rows: list[np.ndarray], d: int, width: int) -> dict:
    """The sums behind the activation metrics of this process's rows, which add over processes."""
    x = np.concatenate(rows) if rows else np.zeros((0, d), np.float32)
    n = x.shape[0]
    if n == 0:  # more processes than sequences
        return {"n": 0, "active": 0.0, "sq_err": 0.0, "counts": np.zeros(width), "sum_x": np.zeros(d), "sum_sq": 0.0}
    m = evaluate_rows(sae_params, x)
    sum_x, sum_sq = np.zeros(d), 0.0
    for start in range(0, n, 4096):  # float64 sums without a float64 copy of every row
        chunk = x[start : start + 4096].astype(np.float64)
        sum_x += chunk.sum(axis=0)
        sum_sq += float(np.einsum("ij,ij->", chunk, chunk))
    return {
        "n": n,
        "active": m["l0"] * n,
        "sq_err": m["mse"] * n,
        "counts": np.round(m["firing_frequency"] * n),  # exact: counts / n was computed in float64
        "sum_x": sum_x,
        "sum_sq": sum_sq,
    }


def _row_metrics(s: dict) -> dict:
    """`evaluate_rows`'s metrics from row sums (of one process or of all)."""
    n = s["n"]
    mean = s["sum_x"] / n
    total_var = s["sum_sq"] - n * float(mean @ mean)
    freq = s["counts"] / n
    return {
        "tokens": int(n),
        "l0": s["active"] / n,
        "mse": s["sq_err"] / n,
        "fvu": s["sq_err"] / max(total_var, 1e-30),
        "dead_fraction": float(np.mean(s["counts"] == 0)),
        "dense_fraction": float(np.mean(freq > 0.1)),
        "firing_frequency": freq,
    }


def _sum_over_processes(scalars: list, row_sums: dict):
    """(scalars, row_sums) added over every process: one float64 vector, all-gathered.

    The vector travels as uint32 words (JAX computes without 64-bit types by default and would
    round float64 to float32), so the sums are exact whatever the number of processes.
    """
    keys = sorted(row_sums)
    parts = [np.asarray(scalars, np.float64)] + [np.atleast_1d(np.asarray(row_sums[k], np.float64)) for k in keys]
    flat = np.concatenate(parts)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        words = multihost_utils.process_allgather(flat.view(np.uint32))  # [processes, 2·len]
        flat = np.ascontiguousarray(np.asarray(words, np.uint32)).view(np.float64).sum(axis=0)
    sizes = np.cumsum([p.size for p in parts])[:-1]
    scalars_out, *arrays = np.split(flat, sizes)
    out = {k: (a if isinstance(row_sums[k], np.ndarray) else float(a[0])) for k, a in zip(keys, arrays, strict=True)}
    out["n"] = int(out["n"])
    return [float(v) for v in scalars_out], out
