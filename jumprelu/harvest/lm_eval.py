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
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jumprelu.core import folded, layout
from jumprelu.errors import DataError
from jumprelu.evaluate.metrics import evaluate_rows
from jumprelu.harvest import gemma_model
from jumprelu.harvest import text as text_lib


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
    from jumprelu.harvest.run import load_lm

    if not lm_cfg.eval.texts:
        raise DataError("config field eval.texts is empty: set --lm.eval.texts='(\"heldout.jsonl\",)'")
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
    seqs = text_lib.sequences(list(lm_cfg.eval.texts), tokenizer, lm_cfg.seq_len, lm_cfg.text_field)
    seqs = itertools.islice(seqs, lm_cfg.eval.sequences)
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
    if not scored:
        raise DataError(f"eval texts {list(lm_cfg.eval.texts)} gave no scorable tokens")
    ce = {name: total / scored for name, total in sums.items()}
    stats = evaluate_rows(dict(sae.params(), k=sae.k), np.concatenate(rows))
    return {
        "sequences": sequences,
        "scored_tokens": scored,
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
