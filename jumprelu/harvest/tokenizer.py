"""Gemma's tokenizer from a local sentencepiece model, its special ids, and its chat template.

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
import os

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
