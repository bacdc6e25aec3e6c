"""Feature statistics for dashboards (Neuronpedia-style): how often each latent fires, and where.

`jumprelu export WORKDIR OUT_DIR --format neuronpedia [--top 20]` encodes the run's held-out rows
(the same `data.eval_rows` the report uses) and writes:

  feature_stats.json   header: model, hook_name, width, eval_rows, top, the files below, and a
                       histogram of log10 firing frequency (the "feature density" plot)
  features.jsonl       one JSON object per latent, in latent order:
                         {"index": i, "firing_frequency": share of held-out rows where f_i > 0,
                          "max_activation": largest f_i, "top": [{"row": held-out row index,
                          "activation": f_i, "store_shard": s, "store_row": r,
                          ("tokens": [...], "token_ids": [...], "position": p)}, ...]}
                       `top` lists up to --top rows, largest activation first.

Activation stores hold activations, not token ids, so contexts ("tokens" around the activating
token, which sits at index `position`) are given only where the store's harvest can be replayed:
a store written by `jumprelu harvest` records its texts, tokenizer and sequence length, and its
rows are a pure function of them (jumprelu.harvest.contexts). For a converted .npy or synthetic
data there are no tokens: the top rows are given by their held-out and store indices only.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jumprelu import fs
from jumprelu.export import hooks

FORMAT = "jumprelu-feature-stats"
FORMAT_VERSION = 1


@functools.partial(jax.jit, static_argnames=("k", "top"))
def _chunk(params, x, best_vals, best_rows, offset, k, top):
    f = _encode(params, x, k)  # [n, M]
    f = jnp.where(jnp.isnan(f), 0.0, f)  # a NaN row (encode keeps it NaN) fires nothing here: top_k ranks NaN first
    counts = jnp.sum(f > 0, axis=0)
    rows = offset + jnp.arange(x.shape[0])
    vals = jnp.concatenate([best_vals, f.T], axis=1)  # [M, top + n]
    idx = jnp.concatenate([best_rows, jnp.broadcast_to(rows, (f.shape[1], x.shape[0]))], axis=1)
    v, i = jax.lax.top_k(vals, top)
    return counts, v, jnp.take_along_axis(idx, i, axis=1)


def _encode(params, x, k):
    from jumprelu.core import folded

    return folded.encode(params["W_enc"], params["b_enc"], params["threshold"], x, k)


def feature_stats(sae, rows: np.ndarray, top: int = 20, chunk_rows: int = 2048) -> dict:
    """firing_frequency [M], max_activation [M], top_values [M, top], top_rows [M, top] (-1: none)."""
    n, m = rows.shape[0], sae.width
    top = max(1, min(top, n))
    params = {k: jnp.asarray(getattr(sae, k), jnp.float32) for k in ("W_enc", "b_enc", "threshold")}
    best_vals = jnp.full((m, top), -jnp.inf, jnp.float32)
    best_rows = jnp.full((m, top), -1, jnp.int32)
    counts = np.zeros(m, np.int64)
    for start in range(0, n, chunk_rows):
        x = jnp.asarray(rows[start : start + chunk_rows], jnp.float32)
        c, best_vals, best_rows = _chunk(params, x, best_vals, best_rows, jnp.int32(start), sae.k, top)
        counts += np.asarray(c)
    vals, idx = np.asarray(best_vals), np.asarray(best_rows)
    idx = np.where(vals > 0, idx, -1)  # only rows where the latent fired
    return {
        "firing_frequency": counts / max(n, 1),
        "max_activation": np.where(counts > 0, np.max(vals, axis=1), 0.0),
        "top_values": np.where(idx >= 0, vals, 0.0),
        "top_rows": idx,
    }


def eval_rows(workdir: str, config: dict, store: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """The run's held-out rows [N, d], where each lives in the store [N, 2] (shard, row), and the store path.

    store: where the run's store moved to (checked to hold the rows it trained on); default the recorded one."""
    import ml_collections

    from jumprelu import data as data_lib
    from jumprelu.errors import UserError

    data_cfg = ml_collections.ConfigDict(config["data"])
    data_cfg.source = data_lib.run_source(config, store, "jumprelu export --format neuronpedia")
    store = data_lib.open_source(data_cfg, workdir)
    data_lib.check_same_store(config, store, "export --format neuronpedia")
    stream = data_lib.make_stream(data_cfg, store)
    # as the reports: without the rows the target-L0 controller read during training
    from jumprelu.config import controller_rows
    from jumprelu.core.init import report_rows

    read = controller_rows(ml_collections.ConfigDict({"sae": config.get("sae") or {}}))
    rows = report_rows(stream.eval_set(), read)
    if not len(rows):  # statistics of no rows would call every latent dead
        raise UserError(
            f"{workdir}: no held-out rows for feature statistics: data.eval_rows={data_cfg.eval_rows} and the "
            f"target-L0 controller read {read} of them (a larger data.eval_rows in training leaves some)"
        )
    return rows, report_rows(stream.eval_index(), read), store.path


ContextsFn = Callable[[np.ndarray], list]  # store coordinates [n, 2] -> per row {tokens, token_ids, position} or None


def export(
    sae,
    path: str,
    rows: np.ndarray,
    coords: np.ndarray | None = None,
    contexts: ContextsFn | None = None,
    top: int = 20,
) -> dict:
    """Writes feature_stats.json and features.jsonl for `sae` on `rows`; returns the header."""
    s = feature_stats(sae, rows, top)
    used = sorted({int(r) for r in s["top_rows"].ravel() if r >= 0})
    ctx = {}
    if contexts is not None and coords is not None and used:
        ctx = dict(zip(used, contexts(coords[used]), strict=True))
    p = hooks.provenance(sae.config)
    freq = s["firing_frequency"]
    edges = np.arange(-7.0, 0.5, 0.5)
    hist, _ = np.histogram(np.log10(np.maximum(freq, 1e-10)), bins=np.concatenate([[-np.inf], edges[1:], [np.inf]]))
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": p.get("hf_model"),
        "hook_name": p.get("hook_name"),
        "width": sae.width,
        "d_in": sae.d_model,
        "eval_rows": int(rows.shape[0]),
        "top": int(s["top_rows"].shape[1]),
        "has_contexts": bool(ctx),
        "dead_latents": int(np.sum(freq == 0)),
        "log10_frequency_histogram": {"upper_edges": [*edges[1:].tolist(), None], "counts": hist.tolist()},
        "files": {"features": "features.jsonl"},
    }
    lines = []
    for i in range(sae.width):
        tops = []
        for v, r in zip(s["top_values"][i], s["top_rows"][i], strict=True):
            if r < 0:
                continue
            entry = {"row": int(r), "activation": float(v)}
            if coords is not None:
                entry.update(store_shard=int(coords[r, 0]), store_row=int(coords[r, 1]))
            if ctx.get(int(r)):
                entry.update(ctx[int(r)])
            tops.append(entry)
        rec = {"index": i, "firing_frequency": float(freq[i]), "max_activation": float(s["max_activation"][i])}
        lines.append(json.dumps({**rec, "top": tops}) + "\n")
    fs.makedirs(path)
    fs.remove(fs.join(path, "feature_stats.json"))  # as saelens.export: never another SAE's header left beside
    fs.write_text_atomically(fs.join(path, "features.jsonl"), "".join(lines))
    fs.write_text_atomically(fs.join(path, "feature_stats.json"), json.dumps(header, indent=2))
    return header
