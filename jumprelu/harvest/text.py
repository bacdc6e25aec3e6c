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

Chat template (for instruction-tuned models, `SentencePieceTokenizer(path, chat_template=True)`):
each document becomes Gemma's turns, `<start_of_turn>user\n{text}<end_of_turn>\n`; a JSONL
document may instead be a conversation, a list of {"role", "content"} messages under
`text_field` (roles user, model or assistant, and system, which Gemma folds into the first
user turn). The template pieces (`<start_of_turn>`, the role, its newline; `<end_of_turn>` and
its newline) are tokenised apart from the content, so their ids are fixed sequences, and
`keep_mask` masks them like BOS wherever they occur; `pack` never cuts one in two (it pads the
sequence instead), so a piece is recognisable in every sequence.
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
    # Chat template: id sequences masked wherever they occur, and ids masked wherever they occur
    # (<start_of_turn>, <end_of_turn>: also a literal one in a text is not content).
    template: tuple[tuple[int, ...], ...] = ()
    turn: tuple[int, ...] = ()


CHAT_ROLES = ("user", "model", "assistant", "system")
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"


class ChatTemplate:
    """Gemma's chat template as token ids: each turn is header(role) + content + footer."""

    def __init__(self, tokenizer, path: str):
        ids = {}
        for piece in (START_OF_TURN, END_OF_TURN):
            i = tokenizer.piece_id(piece)
            if i is None:
                raise DataError(
                    f"tokenizer {path}: no {piece} piece; chat_template needs Gemma's chat tokens "
                    "(Gemma 2 and Gemma 3 tokenizers have them)"
                )
            ids[piece] = i
        self.start, self.end = ids[START_OF_TURN], ids[END_OF_TURN]
        self._encode = tokenizer.encode
        # The role and its newline are encoded apart from the special id, so the header's ids do
        # not depend on whether the tokenizer turns the literal "<start_of_turn>" into its id.
        self.headers = {role: (self.start, *tokenizer.encode(f"{role}\n")) for role in ("user", "model")}
        self.footer = (self.end, *tokenizer.encode("\n"))

    @property
    def patterns(self) -> tuple[tuple[int, ...], ...]:
        return (*self.headers.values(), self.footer)

    def encode(self, document) -> list[int]:
        """A text (one user turn) or a conversation (list of {role, content}) as ids."""
        turns = [("user", document)] if isinstance(document, str) else _gemma_turns(document)
        out: list[int] = []
        for role, content in turns:
            out += [*self.headers[role], *self._encode(content), *self.footer]
        return out


def _gemma_turns(messages) -> list[tuple[str, str]]:
    """(role, content) in Gemma's roles: assistant -> model; a system message is prepended to the
    next user turn (Gemma has no system role; its chat template does the same)."""
    turns, system = [], None
    for m in messages:
        role = "model" if m["role"] == "assistant" else m["role"]
        if role == "system":
            system = m["content"]
            continue
        content = m["content"]
        if system is not None and role == "user":
            content, system = f"{system}\n\n{content}", None
        turns.append((role, content))
    if system is not None:
        turns.append(("user", system))
    return turns


class SentencePieceTokenizer:
    """Gemma's tokenizer from a local sentencepiece model file (Gemma: pad 0, eos 1, bos 2).

    With `chat_template`, documents are wrapped in Gemma's chat turns (see the module docstring)
    and `special` lists the template's ids, so `keep_mask` masks them.
    """

    def __init__(self, path: str, chat_template: bool = False):
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
        self.chat = ChatTemplate(self, path) if chat_template else None
        if self.chat is not None:
            self.special = dataclasses.replace(
                self.special, template=self.chat.patterns, turn=(self.chat.start, self.chat.end)
            )

    def piece_id(self, piece: str) -> int | None:
        """The id of a piece, or None when the vocabulary does not have it."""
        i = self._sp.piece_to_id(piece)
        return None if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i) else int(i)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def pieces(self, ids) -> list[str]:
        """Each id's token string (sentencepiece's piece: '▁' marks a leading space)."""
        return [self._sp.id_to_piece(int(i)) for i in ids]


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
