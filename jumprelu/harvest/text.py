"""Text in, packed token sequences out: the deterministic front half of the harvest.

Sources are plain text files (one document per file, or per blank-line-separated paragraph
with `split_paragraphs`), JSONL files (one document per line, its text under `text_field`),
and pre-tokenised `.npy` token-id arrays (1-D: one stream; 2-D: one document per row, pad
ids dropped). Documents are tokenised with a sentencepiece model (Gemma's tokenizer is one),
joined into one stream with EOS after each document, and cut into sequences of `seq_len`
that each start with BOS: sequence i is BOS + stream[i·(seq_len-1) : (i+1)·(seq_len-1)],
the last one padded. Sequence i therefore depends only on the sources and the tokenizer,
which is what makes an interrupted harvest resumable row for row.

`keep_mask` marks the positions whose activations are stored: not BOS, EOS or padding
(Gemma Scope drops them; BOS activations are outliers that would dominate the scale).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import numpy as np

from jumprelu.errors import DataError


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    pad: int


class SentencePieceTokenizer:
    """Gemma's tokenizer from a local sentencepiece model file (Gemma: pad 0, eos 1, bos 2)."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise DataError(f"tokenizer {path}: no such file (expected a sentencepiece .model)")
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"tokenizer {path}: not a sentencepiece model ({e})") from None
        self.path = path
        pad = self._sp.pad_id()
        self.special = SpecialIds(bos=self._sp.bos_id(), eos=self._sp.eos_id(), pad=pad if pad >= 0 else 0)
        self.vocab_size = self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def pieces(self, ids) -> list[str]:
        """Each id's token string (sentencepiece's piece: '▁' marks a leading space)."""
        return [self._sp.id_to_piece(int(i)) for i in ids]


def iter_documents(paths: list[str], text_field: str = "text", split_paragraphs: bool = False) -> Iterator:
    """Yields str documents (text/JSONL) or int arrays (pre-tokenised .npy), in the given order."""
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"text source {path}: no such file")
        if path.endswith(".npy"):
            ids = np.load(path, allow_pickle=False)
            if not np.issubdtype(ids.dtype, np.integer) or ids.ndim not in (1, 2):
                raise DataError(
                    f"text source {path}: expected 1-D or 2-D integer token ids, found {ids.dtype} {ids.shape}"
                )
            yield from ([ids] if ids.ndim == 1 else list(ids))
        elif path.endswith((".jsonl", ".json")):
            with open(path) as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"text source {path}, line {n}: not JSON ({e.msg})") from None
                    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                        raise DataError(f"text source {path}, line {n}: no string field {text_field!r}")
                    yield record[text_field]
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            yield from ([p for p in text.split("\n\n") if p.strip()] if split_paragraphs else [text])


def token_stream(documents, tokenizer, special: SpecialIds) -> Iterator[np.ndarray]:
    """Each document's ids followed by EOS (pad ids of pre-tokenised rows dropped)."""
    for doc in documents:
        if isinstance(doc, str):
            ids = np.asarray(tokenizer.encode(doc), np.int32)
        else:
            ids = np.asarray(doc, np.int32)
            ids = ids[ids != special.pad]
        yield np.concatenate([ids, np.asarray([special.eos], np.int32)])


def pack(stream: Iterator[np.ndarray], seq_len: int, special: SpecialIds) -> Iterator[np.ndarray]:
    """Sequences [seq_len] of BOS + seq_len-1 stream tokens; the last is padded."""
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, found {seq_len}")
    body = seq_len - 1
    pending = np.zeros(0, np.int32)
    for ids in stream:
        pending = np.concatenate([pending, ids])
        while pending.size >= body:
            yield np.concatenate([[special.bos], pending[:body]]).astype(np.int32)
            pending = pending[body:]
    if pending.size:
        pad = np.full(body - pending.size, special.pad, np.int32)
        yield np.concatenate([[special.bos], pending, pad]).astype(np.int32)


def keep_mask(tokens: np.ndarray, special: SpecialIds) -> np.ndarray:
    """True where a position's activation is stored: not BOS, EOS or padding."""
    return (tokens != special.bos) & (tokens != special.eos) & (tokens != special.pad)


def sequences(paths, tokenizer, seq_len: int, text_field: str = "text", split_paragraphs: bool = False):
    """The packed sequences of the sources, in order."""
    docs = iter_documents(paths, text_field, split_paragraphs)
    return pack(token_stream(docs, tokenizer, tokenizer.special), seq_len, tokenizer.special)


def batches(seqs: Iterator[np.ndarray], batch_sequences: int, special: SpecialIds):
    """(first sequence index, tokens [n, seq_len]) with n = batch_sequences except maybe the last;
    short batches are padded with all-pad sequences, whose positions are all masked out."""
    index, chunk = 0, []
    for seq in seqs:
        chunk.append(seq)
        if len(chunk) == batch_sequences:
            yield index, np.stack(chunk)
            index, chunk = index + len(chunk), []
    if chunk:
        n = len(chunk)
        chunk += [np.full_like(chunk[0], special.pad)] * (batch_sequences - n)
        yield index, np.stack(chunk)
