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


def harvest_sites(cfg) -> list[tuple[str, int]]:
    """The (site, layer) pairs to harvest: `cfg.sites` ('site:layer' strings) or else (site, layer)."""
    from jumprelu.errors import DataError

    if not cfg.sites:
        return [(cfg.site, cfg.layer)]
    pairs = []
    for item in cfg.sites:
        name, sep, layer = str(item).partition(":")
        if not sep or not layer.strip().lstrip("-").isdigit():
            raise DataError(f"config field sites: expected 'site:layer' items like 'resid:20', found {item!r}")
        pairs.append((name.strip(), int(layer)))
    if len(set(pairs)) != len(pairs):
        raise DataError(f"config field sites lists a site twice: {list(cfg.sites)}")
    return pairs


def store_paths(cfg, pairs) -> list[str]:
    """One store per (site, layer): `cfg.store` with {site} and {layer} filled in."""
    from jumprelu.errors import DataError

    if not cfg.store:
        raise DataError("config field store is empty: set --config.store=PATH")
    if len(pairs) > 1 and not ("{site}" in cfg.store and "{layer}" in cfg.store):
        raise DataError(
            f"config field store is {cfg.store!r}, but {len(pairs)} sites are harvested: it must contain "
            "{site} and {layer}, e.g. --config.store='/data/stores/{site}_l{layer}'"
        )
    return [cfg.store.format(site=site, layer=layer) for site, layer in pairs]


def harvest(cfg) -> dict:
    """Harvests every site of `harvest_sites(cfg)` from one forward pass per batch, each into its
    own store (resumable; stores an earlier run already completed are left as they are)."""
    import jax.numpy as jnp
    import numpy as np

    from jumprelu.errors import DataError
    from jumprelu.harvest import collect as collect_lib
    from jumprelu.harvest import gemma_model
    from jumprelu.harvest import text as text_lib
    from jumprelu.store import StoreWriter
    from jumprelu.store import format as store_format

    pairs = harvest_sites(cfg)
    paths = store_paths(cfg, pairs)
    if not cfg.texts:
        raise DataError("config field texts is empty: set --config.texts='(\"a.jsonl\", ...)'")
    lm = load_lm(cfg)
    tokenizer, params, config = lm.tokenizer, lm.params, lm.model.config
    sites = [gemma_model.check_site(config, site, layer) for site, layer in pairs]
    complete = [p for p in paths if os.path.exists(os.path.join(p, store_format.METADATA))]
    if len(complete) == len(paths):
        raise DataError(
            f"store {paths[0]} is already complete ({store_format.METADATA} exists); write to a new directory"
        )
    todo = [(site, path) for site, path in zip(sites, paths, strict=True) if path not in complete]
    writers = [
        StoreWriter(
            path,
            d_model=gemma_model.site_width(config, site.name),
            dtype=cfg.store_dtype,
            model=cfg.model,
            site=site.name,
            layer=site.layer,
            text_source=",".join(os.path.abspath(p) for p in cfg.texts),
            shuffle_seed=cfg.shuffle_seed,
            shard_rows=cfg.shard_rows,
            extra={"checkpoint": cfg.checkpoint, "tokenizer": os.path.abspath(cfg.tokenizer), "seq_len": cfg.seq_len},
        )
        for site, path in todo
    ]
    run = gemma_model.sites_fn(lm.model, tuple(site for site, _ in todo))
    seqs = text_lib.sequences(list(cfg.texts), tokenizer, cfg.seq_len, cfg.text_field, cfg.split_paragraphs)
    kill_after = int(os.environ.get("JUMPRELU_HARVEST_KILL_AFTER_BATCHES", "-1"))  # the resume test's crash
    computed = [0]

    def activations(tokens):
        if computed[0] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # die like a preempted VM: no cleanup, no close
        computed[0] += 1
        return [np.asarray(a) for a in run(params, jnp.asarray(tokens))]

    result = collect_lib.collect(
        seqs,
        activations,
        writers,
        tokenizer.special,
        cfg.batch_sequences,
        max_rows=cfg.max_tokens,
        progress=cfg.progress,
    )
    result["stores"] = [path for _, path in todo]
    result["already_complete"] = complete
    return result


def model_config(cfg, tokenizer):
    """The tiny test model's config (vocabulary from the tokenizer); None for the released sizes."""
    if cfg.model != "tiny":
        return None
    from jumprelu.harvest import gemma_model

    return gemma_model.tiny_config(tokenizer.vocab_size, cfg.tiny.num_layers, cfg.tiny.embed_dim)
