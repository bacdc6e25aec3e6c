"""Token contexts of store rows, by replaying the harvest's tokenization (no model needed).

A harvested store's rows are, before the writer's per-shard shuffle, the kept positions (not
BOS, EOS, padding or chat template pieces) of the packed sequences, sequence by sequence (jumprelu.harvest.collect).
The shuffle is seeded by (shuffle_seed, shard index), so store row (s, r) is harvest row
sum(rows of shards < s) + perm_s[r]; replaying the texts through the tokenizer and packer
gives that row's sequence and position. The store's metadata records the texts, tokenizer and
seq_len (and, from this version on, text_field and split_paragraphs; earlier stores used the
defaults "text" and false; chat_template, recorded from Gemma 3 on, defaults to false).

A store harvested by P processes (metadata `parts`: P) holds P parts: part k's rows are the kept
positions of sequences k, k + P, k + 2P, ... (`collect.host_sequences`), in its own shards
shard-pKKK-NNNNN.npy, each shuffled with the seed (shuffle_seed, k, N).
"""

from __future__ import annotations

import os

import numpy as np

from jumprelu.store import format as store_format


def part_rows(meta: dict, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(part, harvest row within that part) of each store coordinate (shard, row within the shard);
    part 0 for a store one process wrote."""
    seed = meta.get("shuffle_seed")
    shard_part, shard_index, shard_first, sizes = [], [], [], []
    written = {}  # rows of the shards already listed, per part
    for i, shard in enumerate(meta["shards"]):
        name = str(shard.get("file", ""))
        part, index = store_format.part_shard(name) or (None, i)
        shard_part.append(part)
        shard_index.append(index)
        shard_first.append(written.get(part, 0))
        sizes.append(int(shard["rows"]))
        written[part] = written.get(part, 0) + sizes[-1]
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    parts, rows = np.zeros(len(coords), np.int64), np.empty(len(coords), np.int64)
    perms: dict[int, np.ndarray] = {}
    for i, (s, r) in enumerate(coords):
        part = shard_part[s]
        parts[i] = part or 0
        if seed is not None and s not in perms:
            key = [seed, shard_index[s]] if part is None else [seed, part, shard_index[s]]
            perms[s] = np.random.default_rng(key).permutation(sizes[s])
        rows[i] = shard_first[s] + (r if seed is None else perms[s][r])
    return parts, rows


def harvest_rows(meta: dict, coords: np.ndarray) -> np.ndarray:
    """Harvest row index of each store coordinate (shard, row within the shard) of a store one
    process wrote (for several: `part_rows`)."""
    if store_format.written_by_parts(meta):
        raise ValueError("a store written by several processes has one harvest order per part: use part_rows")
    return part_rows(meta, coords)[1]


def store_contexts(store_path: str, before: int = 24, after: int = 8, tokenizer=None):
    """A function store coordinates [n, 2] -> [{tokens, token_ids, position}] for a harvested store,
    or None when the store does not say how it was harvested (converted .npy, synthetic data), or
    was written by several processes without recording how many (stores from before `parts` was
    recorded: the replay could not tell which process held which sequence).

    `tokenizer` replaces the store's recorded sentencepiece model (it needs encode, pieces, special).
    """
    from jumprelu.store.reader import read_metadata

    meta = read_metadata(store_path)
    extra = meta.get("extra") or {}
    texts = [p for p in str(meta.get("text_source") or "").split(",") if p]
    tokenizer_path = extra.get("tokenizer")
    needed = [*texts, *([tokenizer_path] if tokenizer is None else [])]
    if not (texts and extra.get("seq_len") and (tokenizer or tokenizer_path)) or not all(map(os.path.exists, needed)):
        return None
    processes = int(meta.get("parts", 0)) if store_format.written_by_parts(meta) else 1
    if processes < 1:
        return None

    def contexts(coords: np.ndarray) -> list[dict]:
        from jumprelu.harvest import text as text_lib
        from jumprelu.harvest import tokenizer as tokenizer_lib

        chat = bool(extra.get("chat_template"))  # absent before Gemma 3: no chat template
        tok = tokenizer or tokenizer_lib.SentencePieceTokenizer(tokenizer_path, chat_template=chat)
        parts, rows = part_rows(meta, coords)
        # per part, its wanted rows in harvest order, and how far the replay has come through them
        todo = {int(k): sorted(set(rows[parts == k].tolist())) for k in np.unique(parts)}
        next_wanted = dict.fromkeys(todo, 0)
        done = dict.fromkeys(todo, 0)  # kept rows of the part's sequences replayed so far
        found: dict[tuple[int, int], dict] = {}
        left = sum(len(v) for v in todo.values())
        seqs = text_lib.sequences(
            texts, tok, int(extra["seq_len"]), extra.get("text_field", "text"), bool(extra.get("split_paragraphs"))
        )
        for i, seq in enumerate(seqs):
            if not left:
                break
            part = i % processes
            if part not in todo:
                continue
            kept = np.flatnonzero(text_lib.keep_mask(seq, tok.special))
            wanted, j = todo[part], next_wanted[part]
            while j < len(wanted) and wanted[j] < done[part] + len(kept):
                pos = int(kept[wanted[j] - done[part]])
                lo = max(0, pos - before)
                ids = [int(t) for t in seq[lo : pos + after + 1] if t != tok.special.pad]
                found[(part, wanted[j])] = {"tokens": tok.pieces(ids), "token_ids": ids, "position": pos - lo}
                j += 1
                left -= 1
            next_wanted[part] = j
            done[part] += len(kept)
        return [found.get((int(k), int(r))) for k, r in zip(parts, rows, strict=True)]

    return contexts
