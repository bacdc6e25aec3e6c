"""The harvest: texts -> packed sequences -> Gemma 2 site activations -> an activation store.

The command line is `jumprelu harvest` (harvest/__main__.py); see its docstring.

Multi-host (`JUMPRELU_DISTRIBUTED=1` or `mesh.distributed`, the same switch as training: every
host runs the same command) is data-parallel across hosts: each host loads the whole LM,
split over its own chips only (`lm_mesh`), harvests every P-th packed sequence
(`collect.host_sequences`) into its own part of each store, and process 0 writes
metadata.json once every part is complete. No collective crosses hosts during the forward, a
slow or dead host stalls nobody until the end, and each host resumes from its own row count.
Gemma 2 up to 27B fits on one host of a v5e-8 / v5p slice (benchmarks/lm_memory.py), so a
global mesh would only add cross-host weight gathers for the same FLOPs per token.
"""

from __future__ import annotations

import dataclasses
import os
import signal

from jumprelu.harvest.checks import check_before_loading, check_complete_stores


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """What the harvest and the LM evaluation both load from a harvest config."""

    tokenizer: object  # text.SentencePieceTokenizer
    model: object  # gemma_model.Gemma2
    sites: tuple  # gemma_model.Site, checked against the model
    mesh: object  # the devices the params are split over
    params: dict


def load_lm(cfg, pairs=None) -> LanguageModel:
    """Tokenizer, model, checked sites and sharded params named by `cfg` (one-line errors).

    `pairs` are the (site, layer) pairs to check (default: cfg.site, cfg.layer); they are
    checked before the checkpoint is read, so a typo costs seconds, not a 9B restore.
    """
    import jax.numpy as jnp

    from jumprelu.errors import DataError
    from jumprelu.harvest import gemma_model
    from jumprelu.harvest import tokenizer as tokenizer_lib

    for field in ("checkpoint", "tokenizer"):
        if not cfg[field]:
            raise DataError(f"config field {field} is empty: set --config.{field}=PATH")
    tokenizer = tokenizer_lib.SentencePieceTokenizer(cfg.tokenizer, chat_template=bool(cfg.get("chat_template", False)))
    model = gemma_model.make_model(cfg.model, model_config(cfg, tokenizer), dtype=jnp.dtype(cfg.dtype))
    sites = []
    for site, layer in pairs or [(cfg.site, cfg.layer)]:
        try:
            sites.append(gemma_model.check_site(model.config, site, layer))
        except DataError as e:
            fields = "sites/layers" if cfg.get("sites") or cfg.get("layers") else "site/layer"
            raise DataError(f"config fields {fields}: {e}") from None
    mesh = lm_mesh()
    params = gemma_model.load_params(cfg.checkpoint, gemma_model.abstract_params(model, mesh))
    return LanguageModel(tokenizer, model, tuple(sites), mesh, params)


def lm_mesh():
    """The devices the LM's params are split over: every device of this process (one host).

    With several processes each holds its own copy of the LM on its own devices and runs its
    own forwards (data parallel across hosts, see the module docstring).
    """
    import jax

    from jumprelu.core import layout
    from jumprelu.harvest import gemma_model

    if jax.process_count() == 1:
        return gemma_model.device_mesh()
    auto = jax.sharding.AxisType.Auto
    local = jax.local_devices()
    return jax.make_mesh((1, len(local)), layout.AXES, axis_types=(auto, auto), devices=local)


def token_sharding(mesh, batch_sequences: int):
    """Where a batch of tokens [B, T] goes: split by sequence over the LM's devices when they
    divide B, else replicated.

    Split, each device runs the forward on B/n sequences and XLA gathers each layer's weights
    as it needs them; replicated, XLA splits the layers' matmuls instead but repeats part of the
    work on every device. As XLA plans Gemma 2 2B to layer 3 on 8 devices (batch 8 × 1,024):
    0.083 GFLOP per token per device split, 0.113 replicated (1/8 of one device's 0.659 is
    0.082), and 0.50 vs 0.93 GiB of temporaries (benchmarks/lm_memory.py).
    """
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jumprelu.core import layout

    n = mesh.shape[layout.MODEL]
    return NamedSharding(mesh, P(layout.MODEL, None) if batch_sequences % n == 0 else P())


def start_processes(cfg) -> tuple[int, int]:
    """`jax.distributed.initialize` when asked (as training does); returns (this process, processes)."""
    import jax

    from jumprelu.train import distributed

    if not jax.distributed.is_initialized():  # (`jumprelu evaluate --lm` starts them before its stored eval)
        distributed.maybe_initialize(cfg.get("mesh") or {})  # before anything touches a device
    return jax.process_index(), jax.process_count()


def barrier(name: str) -> None:
    """Every process waits here for every other (a no-op for one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def everyone_agrees(ok: bool) -> bool:
    """A barrier that tells every process whether process 0 was `ok` (no process leaves it before
    process 0 has entered it)."""
    import jax

    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def harvest_sites(cfg) -> list[tuple[str, int]]:
    """The (site, layer) pairs to harvest: every name of `cfg.sites` (else `cfg.site`) at every
    layer of `cfg.layers` (else `cfg.layer`), layer by layer."""
    from jumprelu.errors import DataError

    names = list(cfg.sites) or [cfg.site]
    layers = list(cfg.layers) or [cfg.layer]
    pairs = [(name, layer) for layer in layers for name in names]
    if len(set(pairs)) != len(pairs):
        raise DataError(f"config fields sites/layers list a site twice: sites {names}, layers {layers}")
    return pairs


def store_paths(cfg, pairs) -> list[str]:
    """One store per (site, layer): `cfg.store` with {site} and {layer} filled in."""
    from jumprelu.errors import DataError

    if not cfg.store:
        raise DataError("config field store is empty: set --config.store=PATH")
    try:
        paths = [cfg.store.format(site=site, layer=layer) for site, layer in pairs]
    except (KeyError, IndexError, ValueError) as e:
        raise DataError(
            f"config field store {cfg.store!r}: not a path template ({type(e).__name__}: {e}); "
            "its only fields are {site} and {layer}"
        ) from None
    if len(set(paths)) != len(paths):
        raise DataError(
            f"config field store is {cfg.store!r}, but {len(pairs)} sites are harvested: it must contain "
            "{site} and {layer}, e.g. --config.store='/data/stores/{site}_l{layer}'"
        )
    return paths


def harvest(cfg) -> dict:
    """Harvests every site of `harvest_sites(cfg)` from one forward pass per batch, each into its
    own store (resumable; stores an earlier run already completed are left as they are)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jumprelu.errors import DataError
    from jumprelu.harvest import collect as collect_lib
    from jumprelu.harvest import text as text_lib
    from jumprelu.store import StoreWriter
    from jumprelu.store import format as store_format

    pairs = harvest_sites(cfg)
    paths = store_paths(cfg, pairs)
    if not cfg.texts:
        raise DataError("config field texts is empty: set --config.texts='(\"a.jsonl\", ...)'")
    check_before_loading(cfg)
    complete = [p for p in paths if os.path.exists(os.path.join(p, store_format.METADATA))]
    check_complete_stores(cfg, complete)
    if len(complete) == len(paths):  # this harvest, finished (checked above): a rerun, as convert's, does nothing
        from jumprelu.store.reader import read_metadata

        rows = [int(read_metadata(p)["num_rows"]) for p in paths]
        return dict(stores=[], already_complete=complete, num_rows=rows, nothing_to_do=True)
    # after the checks: importing gemma starts TensorFlow, whose start-up lines came before their errors
    from jumprelu.harvest import gemma_model

    process, processes = start_processes(cfg)
    part = dict(part=process, parts=processes) if processes > 1 else {}
    lm = load_lm(cfg, pairs)
    tokenizer, params, config = lm.tokenizer, lm.params, lm.model.config
    todo = [(site, path) for site, path in zip(lm.sites, paths, strict=True) if path not in complete]
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
            extra={
                "checkpoint": cfg.checkpoint,
                "tokenizer": os.path.abspath(cfg.tokenizer),
                "seq_len": cfg.seq_len,
                # with text_source, what replays a row's tokens (jumprelu.harvest.contexts)
                "text_field": cfg.text_field,
                "split_paragraphs": bool(cfg.split_paragraphs),
                "chat_template": bool(cfg.get("chat_template", False)),
                "lm_dtype": cfg.dtype,  # the forward's precision: a resume in another would mix them
            },
            **part,
        )
        for site, path in todo
    ]
    run = gemma_model.sites_fn(lm.model, tuple(site for site, _ in todo))
    placement = token_sharding(lm.mesh, cfg.batch_sequences)
    seqs = text_lib.sequences(list(cfg.texts), tokenizer, cfg.seq_len, cfg.text_field, cfg.split_paragraphs)
    max_rows = cfg.max_tokens
    if processes > 1:  # max_tokens counts the rows of every process: host_sequences cuts there
        seqs, max_rows = collect_lib.host_sequences(seqs, process, processes, tokenizer.special, max_rows), None
    kill_after = int(os.environ.get("JUMPRELU_HARVEST_KILL_AFTER_BATCHES", "-1"))  # the resume test's crash
    computed = [0]

    def activations(tokens):
        if computed[0] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # die like a preempted VM: no cleanup, no close
        computed[0] += 1
        return [np.asarray(a) for a in run(params, jax.device_put(jnp.asarray(tokens), placement))]

    result = collect_lib.collect(
        seqs,
        activations,
        writers,
        tokenizer.special,
        cfg.batch_sequences,
        max_rows=max_rows,
        progress=cfg.progress and process == 0,
    )
    stores = [path for _, path in todo]
    committed = stores if processes == 1 else []
    if processes > 1:  # every part is complete (closed) before one process commits the stores
        from jumprelu.store.commit import commit_parts

        barrier("jumprelu harvest: every part written")
        failure = None
        if process == 0:
            try:
                result["num_rows"] = [commit_parts(path, processes)["num_rows"] for path in stores]
                committed = stores
            except Exception as e:  # any failure: re-raised below, once the others know
                failure = e
        # every host returns with the stores complete, or fails with process 0 (a plain barrier here
        # left the others waiting for a process that had already exited)
        if not everyone_agrees(failure is None):
            if failure is not None:
                raise failure
            raise DataError(
                f"jumprelu harvest: process 0 could not write metadata.json of {', '.join(stores)} (its log says "
                "why); this process's part is complete: fix that and run the same command on every process again"
            )
    result.update(stores=stores, already_complete=complete, process=process, processes=processes)
    result["committed"] = committed  # the stores whose metadata.json this process wrote
    return result


def model_config(cfg, tokenizer):
    """The tiny test model's config (vocabulary from the tokenizer); None for the released sizes."""
    from jumprelu.harvest import gemma_model, tiny

    if cfg.model not in gemma_model.TINY:
        return None
    family = gemma_model.family(cfg.model)
    return tiny.tiny_config(tokenizer.vocab_size, cfg.tiny.num_layers, cfg.tiny.embed_dim, family)
