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

The tokenizer and Gemma's chat template, whose pieces `keep_mask` masks and `pack` never cuts in
two, are in `tokenizer.py`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np

from jumprelu.errors import DataError
from jumprelu.harvest.tokenizer import CHAT_ROLES, SpecialIds


def iter_documents(paths: list[str], text_field: str = "text", split_paragraphs: bool = False) -> Iterator:
    """Yields str documents (text/JSONL), conversations (JSONL: a list of {role, content} under
    `text_field`) or int arrays (pre-tokenised .npy), in the given order."""
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"text source {path}: no such file")
        if path.endswith(".npy"):
            try:
                ids = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:  # not an .npy, or pickled objects
                raise DataError(f"text source {path}: not a readable .npy of token ids ({e})") from None
            if not np.issubdtype(ids.dtype, np.integer) or ids.ndim not in (1, 2):
                raise DataError(
                    f"text source {path}: expected 1-D or 2-D integer token ids, found {ids.dtype} {ids.shape}"
                )
            if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= 2**31):  # the harvest's ids are int32
                raise DataError(
                    f"text source {path}: token ids must be in [0, 2^31), found {int(ids.min())}..{int(ids.max())}"
                )
            yield from ([np.asarray(ids)] if ids.ndim == 1 else (np.asarray(row) for row in ids))
        elif path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                for n, line in _utf8_lines(path, f):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"text source {path}, line {n}: not JSON ({e.msg})") from None
                    value = record.get(text_field) if isinstance(record, dict) else None
                    if isinstance(value, list):
                        _check_conversation(value, f"text source {path}, line {n}, field {text_field!r}")
                    elif not isinstance(value, str):
                        raise DataError(
                            f"text source {path}, line {n}: no string field {text_field!r} "
                            "(or conversation: a list of {role, content} messages)"
                        )
                    yield value
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except UnicodeDecodeError as e:
                raise DataError(f"text source {path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
            yield from ([p for p in text.split("\n\n") if p.strip()] if split_paragraphs else [text])


def _utf8_lines(path: str, f):
    """(line number, line) of a text file opened as UTF-8; a byte that is not UTF-8 is a DataError
    naming the file and line, not a UnicodeDecodeError traceback."""
    n = 0
    try:
        for n, line in enumerate(f, 1):  # noqa: B007 -- n names the failing line below
            yield n, line
    except UnicodeDecodeError as e:
        raise DataError(f"text source {path}, line {n + 1}: not UTF-8 text ({e.reason})") from None


def _check_conversation(messages: list, where: str) -> None:
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in CHAT_ROLES and isinstance(m.get("content"), str)):
            raise DataError(
                f"{where}, message {i}: expected {{'role': one of {CHAT_ROLES}, 'content': str}}, found {m!r:.80}"
            )


def token_stream(documents, tokenizer, special: SpecialIds) -> Iterator[np.ndarray]:
    """Each document's ids followed by EOS (pad ids of pre-tokenised rows dropped); texts and
    conversations in the chat template when the tokenizer has one."""
    chat = getattr(tokenizer, "chat", None)
    for doc in documents:
        if isinstance(doc, list) and chat is None:
            raise DataError(
                "a text source has conversations (lists of messages): they need the chat template, "
                "set --config.chat_template=True"
            )
        if chat is not None and isinstance(doc, str | list):
            ids = np.asarray(chat.encode(doc), np.int32)
        elif isinstance(doc, str):
            ids = np.asarray(tokenizer.encode(doc), np.int32)
        else:
            ids = np.asarray(doc, np.int32)
            ids = ids[ids != special.pad]
            vocab = getattr(tokenizer, "vocab_size", None)
            if vocab and ids.size and int(ids.max()) >= vocab:  # the model would embed a wrong or no row
                raise DataError(
                    f"a pre-tokenised text source holds token id {int(ids.max())}, outside the tokenizer's "
                    f"{vocab} ids: tokenised for another model?"
                )
        yield np.concatenate([ids, np.asarray([special.eos], np.int32)])


def pack(stream: Iterator[np.ndarray], seq_len: int, special: SpecialIds) -> Iterator[np.ndarray]:
    """Sequences [seq_len] of BOS + seq_len-1 stream tokens; the last is padded. A chat template
    piece that would be cut in two starts the next sequence instead (this one is padded)."""
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, found {seq_len}")
    body = seq_len - 1
    longest = max(map(len, special.template), default=0)
    if longest > body:
        raise DataError(f"seq_len {seq_len} is too short for the chat template: it needs >= {longest + 1}")
    pending = np.zeros(0, np.int32)
    for ids in stream:
        pending = np.concatenate([pending, ids])
        while pending.size >= body:
            cut = _cut_before_piece(pending, body, special.template)
            pad = np.full(body - cut, special.pad, np.int32)
            yield np.concatenate([[special.bos], pending[:cut], pad]).astype(np.int32)
            pending = pending[cut:]
    if pending.size:
        pad = np.full(body - pending.size, special.pad, np.int32)
        yield np.concatenate([[special.bos], pending, pad]).astype(np.int32)


def _cut_before_piece(pending: np.ndarray, body: int, pieces) -> int:
    """`body`, or the start of a piece that begins before `body` and ends after it. A document's
    ids enter `pending` whole, so a piece starting before `body` is complete in it."""
    for piece in pieces:
        m = len(piece)
        for s in range(max(0, body - m + 1), body):
            if s + m <= pending.size and tuple(pending[s : s + m]) == piece:
                return s
    return body


def template_mask(tokens: np.ndarray, special: SpecialIds) -> np.ndarray:
    """True at the positions of chat template pieces (and lone turn ids), [..., T] like tokens."""
    tokens = np.asarray(tokens)
    out = np.isin(tokens, special.turn) if special.turn else np.zeros(tokens.shape, bool)
    t = tokens.shape[-1]
    for piece in special.template:
        m = len(piece)
        if m > t:
            continue
        hit = np.ones(tokens[..., : t - m + 1].shape, bool)
        for i, tok in enumerate(piece):
            hit &= tokens[..., i : t - m + 1 + i] == tok
        for i in range(m):
            out[..., i : t - m + 1 + i] |= hit
    return out


def keep_mask(tokens: np.ndarray, special: SpecialIds) -> np.ndarray:
    """True where a position's activation is stored: not BOS, EOS, padding or a chat template piece."""
    keep = (tokens != special.bos) & (tokens != special.eos) & (tokens != special.pad)
    if special.template or special.turn:
        keep &= ~template_mask(tokens, special)
    return keep


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
