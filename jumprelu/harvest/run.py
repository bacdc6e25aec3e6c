"""The harvest: texts -> packed sequences -> Gemma 2 site activations -> an activation store.

The command line is `python -m jumprelu.harvest` (harvest/__main__.py); see its docstring.
"""

from __future__ import annotations

import dataclasses
import os
import signal


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """What the harvest and the LM evaluation both load from a harvest config."""

    tokenizer: object  # text.SentencePieceTokenizer
    model: object  # gemma_model.Gemma2
    site: object  # gemma_model.Site
    mesh: object  # the devices the params are split over
    params: dict


def load_lm(cfg) -> LanguageModel:
    """Tokenizer, model, checked site and sharded params named by `cfg` (one-line errors)."""
    import jax.numpy as jnp

    from jumprelu.errors import DataError
    from jumprelu.harvest import gemma_model
    from jumprelu.harvest import text as text_lib

    for field in ("checkpoint", "tokenizer"):
        if not cfg[field]:
            raise DataError(f"config field {field} is empty: set --config.{field}=PATH")
    tokenizer = text_lib.SentencePieceTokenizer(cfg.tokenizer)
    model = gemma_model.make_model(cfg.model, model_config(cfg, tokenizer), dtype=jnp.dtype(cfg.dtype))
    site = gemma_model.check_site(model.config, cfg.site, cfg.layer)
    mesh = gemma_model.device_mesh()
    params = gemma_model.load_params(cfg.checkpoint, gemma_model.abstract_params(model, mesh))
    return LanguageModel(tokenizer, model, site, mesh, params)


def harvest(cfg) -> dict:
    import jax.numpy as jnp
    import numpy as np

    from jumprelu.errors import DataError
    from jumprelu.harvest import collect as collect_lib
    from jumprelu.harvest import gemma_model
    from jumprelu.harvest import text as text_lib
    from jumprelu.store import StoreWriter

    if not cfg.store:
        raise DataError("config field store is empty: set --config.store=PATH")
    if not cfg.texts:
        raise DataError("config field texts is empty: set --config.texts='(\"a.jsonl\", ...)'")
    lm = load_lm(cfg)
    tokenizer, params = lm.tokenizer, lm.params
    run = gemma_model.site_fn(lm.model, lm.site)
    writer = StoreWriter(
        cfg.store,
        d_model=gemma_model.site_width(lm.model.config, cfg.site),
        dtype=cfg.store_dtype,
        model=cfg.model,
        site=cfg.site,
        layer=cfg.layer,
        text_source=",".join(os.path.abspath(p) for p in cfg.texts),
        shuffle_seed=cfg.shuffle_seed,
        shard_rows=cfg.shard_rows,
        extra={"checkpoint": cfg.checkpoint, "tokenizer": os.path.abspath(cfg.tokenizer), "seq_len": cfg.seq_len},
    )
    seqs = text_lib.sequences(list(cfg.texts), tokenizer, cfg.seq_len, cfg.text_field, cfg.split_paragraphs)
    kill_after = int(os.environ.get("JUMPRELU_HARVEST_KILL_AFTER_BATCHES", "-1"))  # the resume test's crash
    computed = [0]

    def activations(tokens):
        if computed[0] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # die like a preempted VM: no cleanup, no close
        computed[0] += 1
        return np.asarray(run(params, jnp.asarray(tokens)))

    return collect_lib.collect(
        seqs,
        activations,
        writer,
        tokenizer.special,
        cfg.batch_sequences,
        max_rows=cfg.max_tokens,
        progress=cfg.progress,
    )


def model_config(cfg, tokenizer):
    """The tiny test model's config (vocabulary from the tokenizer); None for the released sizes."""
    if cfg.model != "tiny":
        return None
    from jumprelu.harvest import gemma_model

    return gemma_model.tiny_config(tokenizer.vocab_size, cfg.tiny.num_layers, cfg.tiny.embed_dim)
