"""What a harvest (and `jumprelu evaluate --lm`) checks before the model loads: a bad value found
only after minutes of loading would also be recorded in the stores' in-progress files, so that
the corrected rerun is refused."""

from __future__ import annotations

import os


def check_model_files(cfg) -> None:
    """The checkpoint and tokenizer fields name what is there (a local path), before gemma is
    imported: its TensorFlow start-up lines came before these errors, seconds later."""
    from jumprelu.errors import DataError

    for field in ("checkpoint", "tokenizer"):
        if not cfg[field]:
            raise DataError(f"config field {field} is empty: set --config.{field}=PATH")
    if "://" not in cfg.checkpoint and not os.path.isdir(cfg.checkpoint):
        raise DataError(f"checkpoint {cfg.checkpoint}: no such directory (expected a Gemma orbax checkpoint)")
    if not os.path.isfile(cfg.tokenizer):
        raise DataError(f"tokenizer {cfg.tokenizer}: no such file (expected a sentencepiece .model)")


def check_before_loading(cfg) -> None:
    """What would otherwise fail only after the model loaded, with the stores' in-progress records
    already naming the bad values (so a corrected rerun would be refused): every text file, the
    first document of each JSONL (its `text_field`), seq_len, shard_rows, shuffle_seed, and the
    model's files."""
    from jumprelu.errors import DataError
    from jumprelu.harvest import text as text_lib

    for path in cfg.texts:
        if not os.path.isfile(path):
            raise DataError(f"text source {path}: no such file")
        # reads a .txt whole (as the harvest does) or a JSONL's first document, or checks the token
        # ids' dtype and range: an undecodable or empty file left an in-progress store naming it
        documents = text_lib.iter_documents([path], cfg.text_field, bool(cfg.get("split_paragraphs", False)))
        if next(documents, None) is None:
            raise DataError(f"text source {path}: holds no document (an empty file?)")
    if not (isinstance(cfg.seq_len, int) and cfg.seq_len >= 2):
        raise DataError(f"config field seq_len must be an integer >= 2 (BOS and a token), found {cfg.seq_len!r}")
    if cfg.shard_rows is not None and not (isinstance(cfg.shard_rows, int) and cfg.shard_rows > 0):
        raise DataError(f"config field shard_rows must be a positive integer or unset, found {cfg.shard_rows!r}")
    if not (isinstance(cfg.shuffle_seed, int) and cfg.shuffle_seed >= 0):
        raise DataError(f"config field shuffle_seed must be an integer >= 0, found {cfg.shuffle_seed!r}")
    # <= 0 would make the whole corpus one batch, or stop at once with a misleading "store full"
    require_positive_int(cfg.batch_sequences, "batch_sequences")
    require_positive_int(cfg.get("max_tokens"), "max_tokens", optional=True)
    check_model_files(cfg)  # last: what the texts' and sizes' checks say comes first


EMPTY_EVAL_TEXTS = "config field eval.texts is empty: set --lm.eval.texts='(\"heldout.jsonl\",)'"


def check_eval_sizes(cfg) -> None:
    """The LM evaluation's sizes (`jumprelu evaluate --lm`), before the model loads."""
    ev = cfg.get("eval")
    if ev is None:
        return
    require_positive_int(ev.get("sequences"), "eval.sequences")
    require_positive_int(ev.get("batch_sequences"), "eval.batch_sequences")


def require_positive_int(value, field: str, optional: bool = False) -> None:
    from jumprelu.errors import DataError

    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        unset = " or unset" if optional else ""
        raise DataError(f"config field {field} must be a positive integer{unset}, found {value!r}")


def check_complete_stores(cfg, complete: list[str]) -> None:
    """Stores an earlier run completed are left as they are only when that run harvested what
    this one would (same model, texts, tokenization, shuffle and dtype): else a one-line
    DataError before the model loads, not a set of stores of two different harvests."""
    from jumprelu.errors import DataError
    from jumprelu.store.reader import read_metadata

    want = {
        "model": cfg.model,
        "dtype": cfg.store_dtype,
        "text_source": ",".join(os.path.abspath(p) for p in cfg.texts),
        "shuffle_seed": cfg.shuffle_seed,
        "extra.seq_len": cfg.seq_len,
        "extra.tokenizer": os.path.abspath(cfg.tokenizer),
        "extra.text_field": cfg.text_field,
        "extra.split_paragraphs": bool(cfg.split_paragraphs),
        "extra.chat_template": bool(cfg.get("chat_template", False)),
        # another checkpoint of the same model name (Gemma 2 9B and 9B-it are both gemma2_9b), or the
        # forward in another precision, gives other activations
        "extra.checkpoint": cfg.checkpoint,
        "extra.lm_dtype": cfg.dtype,
    }
    for path in complete:
        meta = read_metadata(path)
        for field, value in want.items():
            section, _, key = field.rpartition(".")
            recorded = (meta.get("extra") or {}) if section else meta
            if key in recorded and recorded[key] != value:  # (older stores may not record every field)
                raise DataError(
                    f"store {path}: already complete, from another harvest ({field} {recorded[key]!r}, this "
                    f"run's {value!r}); harvest into other directories (config field store) or set it back"
                )
