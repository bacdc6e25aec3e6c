"""Token contexts of store rows, by replaying the harvest's tokenization (no model needed).

A harvested store's rows are, before the writer's per-shard shuffle, the kept positions (not
BOS, EOS, padding or chat template pieces) of the packed sequences, sequence by sequence (jumprelu.harvest.collect).
The shuffle is seeded by (shuffle_seed, shard index), so store row (s, r) is harvest row
sum(rows of shards < s) + perm_s[r]; replaying the texts through the tokenizer and packer
gives that row's sequence and position. The store's metadata records the texts, tokenizer and
seq_len (and, from this version on, text_field and split_paragraphs; earlier stores used the
defaults "text" and false; chat_template, recorded from Gemma 3 on, defaults to false).
"""

from __future__ import annotations

import os

import numpy as np


def harvest_rows(meta: dict, coords: np.ndarray) -> np.ndarray:
    """Harvest row index of each store coordinate (shard, row within the shard)."""
    sizes = [int(s["rows"]) for s in meta["shards"]]
    first = np.concatenate([[0], np.cumsum(sizes)])
    seed = meta.get("shuffle_seed")
    out = np.empty(len(coords), np.int64)
    perms: dict[int, np.ndarray] = {}
    for i, (s, r) in enumerate(np.asarray(coords, np.int64)):
        if seed is None:
            out[i] = first[s] + r
            continue
        if s not in perms:
            perms[s] = np.random.default_rng([seed, int(s)]).permutation(sizes[s])
        out[i] = first[s] + perms[s][r]
    return out


def store_contexts(store_path: str, before: int = 24, after: int = 8, tokenizer=None):
    """A function store coordinates [n, 2] -> [{tokens, token_ids, position}] for a harvested store,
    or None when the store does not say how it was harvested (converted .npy, synthetic data) or
    was written by several processes (each shuffled its own share of the sequences, which the
    replay below does not follow: it would name wrong tokens).

    `tokenizer` replaces the store's recorded sentencepiece model (it needs encode, pieces, special).
    """
    from jumprelu.store import format as store_format
    from jumprelu.store.reader import read_metadata

    meta = read_metadata(store_path)
    extra = meta.get("extra") or {}
    texts = [p for p in str(meta.get("text_source") or "").split(",") if p]
    tokenizer_path = extra.get("tokenizer")
    needed = [*texts, *([tokenizer_path] if tokenizer is None else [])]
    if not (texts and extra.get("seq_len") and (tokenizer or tokenizer_path)) or not all(map(os.path.exists, needed)):
        return None
    if store_format.written_by_parts(meta):
        return None

    def contexts(coords: np.ndarray) -> list[dict]:
        from jumprelu.harvest import text as text_lib

        chat = bool(extra.get("chat_template"))  # absent before Gemma 3: no chat template
        tok = tokenizer or text_lib.SentencePieceTokenizer(tokenizer_path, chat_template=chat)
        wanted = harvest_rows(meta, coords)
        order = np.argsort(wanted)
        found: dict[int, dict] = {}
        seqs = text_lib.sequences(
            texts, tok, int(extra["seq_len"]), extra.get("text_field", "text"), bool(extra.get("split_paragraphs"))
        )
        done, j = 0, 0
        for seq in seqs:
            kept = np.flatnonzero(text_lib.keep_mask(seq, tok.special))
            while j < len(order) and wanted[order[j]] < done + len(kept):
                pos = int(kept[wanted[order[j]] - done])
                lo = max(0, pos - before)
                ids = [int(t) for t in seq[lo : pos + after + 1] if t != tok.special.pad]
                found[int(wanted[order[j]])] = {"tokens": tok.pieces(ids), "token_ids": ids, "position": pos - lo}
                j += 1
            done += len(kept)
            if j == len(order):
                break
        return [found.get(int(w)) for w in wanted]

    return contexts
