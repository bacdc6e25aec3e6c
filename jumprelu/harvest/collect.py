"""The harvest loop: packed sequences -> site activations -> kept rows -> the activation store.

Independent of the model: `activations(tokens [n, T]) -> ([n, T, d_1], ..., [n, T, d_k])` gives
one array per store (several sites from one forward pass). Rows are appended sequence by
sequence, position by position, so a store's row r is a pure function of the sources, the
tokenizer and the model. That makes resuming exact: each writer reports how many rows its
complete shards hold, the loop skips the batches every store already has (recomputing at most
one batch), and gives each store only the rows after its own count. Nothing is duplicated or
lost, whatever the batch size of the resumed run, even when a crash left the stores at
different points.

A multi-host harvest gives each process `host_sequences`: sequence i goes to process
i mod P. Each process is then a one-process harvest of its own sequences into its own part
of the store, resuming from its own row count.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from jumprelu.errors import DataError, stop_on_dropped_ctrl_c
from jumprelu.harvest import text as text_lib
from jumprelu.harvest.tokenizer import SpecialIds
from jumprelu.store import StoreWriter


def host_sequences(
    seqs: Iterator[np.ndarray],
    process: int,
    processes: int,
    special: SpecialIds,
    max_rows: int | None = None,
) -> Iterator[np.ndarray]:
    """This process's share of the packed sequences: sequence i belongs to process i mod `processes`.

    Every process walks every sequence (tokenising is cheap next to the forward pass) and
    counts the kept rows of all of them, so `max_rows` means what it means for one process:
    the first max_rows rows of the texts in order, whichever processes hold them. The
    sequence in which that count passes max_rows is cut there, its later positions padded
    (the model is causal: the positions before the cut keep their activations, and pad
    positions are never stored), and no sequence after it is taken.
    """
    total = 0
    for i, seq in enumerate(seqs):
        keep = text_lib.keep_mask(seq, special)
        n = int(keep.sum())
        if max_rows is not None and total + n >= max_rows:
            if i % processes == process and max_rows > total:
                seq = np.where(np.cumsum(keep) > max_rows - total, special.pad, seq).astype(seq.dtype)
                yield seq
            return
        total += n
        if i % processes == process:
            yield seq


def collect(
    seqs: Iterator[np.ndarray],
    activations: Callable[[np.ndarray], Sequence[np.ndarray]],
    writers: Sequence[StoreWriter],
    special: SpecialIds,
    batch_sequences: int,
    max_rows: int | None = None,
    progress: bool = True,
) -> dict:
    """Fills every writer and closes them.

    Returns {rows (each store's total), skipped_rows (rows every store already had, not
    recomputed), resumed_from (per store), sequences, seconds, tokens_per_s}.
    """
    resume_at = [w.rows_written for w in writers]
    if max_rows is not None and max(resume_at) > max_rows:
        ahead = writers[resume_at.index(max(resume_at))].path
        raise DataError(
            f"store {ahead} already holds {max(resume_at)} rows, more than max_tokens={max_rows}: "
            "resume with the max_tokens it was started with"
        )
    skip = min(resume_at)
    done = 0  # rows of the sequences walked so far (stored before or now)
    computed_tokens, t0 = 0, time.perf_counter()
    bar = tqdm(total=max_rows, initial=skip, unit="tok", unit_scale=True, disable=not progress, mininterval=1.0)
    sequences = 0
    for _, tokens in text_lib.batches(seqs, batch_sequences, special):
        stop_on_dropped_ctrl_c()  # a Ctrl-C whose KeyboardInterrupt Python dropped in one of jax's gc callbacks
        mask = text_lib.keep_mask(tokens, special)
        n = int(mask.sum())
        sequences += int((tokens != special.pad).any(axis=1).sum())
        if done + n <= skip:  # every row of this batch is already in every store's complete shards
            done += n
            continue
        outputs = activations(tokens)
        computed_tokens += int(tokens.size)
        last = n if max_rows is None else min(n, max_rows - done)  # this batch's rows within max_rows
        for writer, start, out in zip(writers, resume_at, outputs, strict=True):
            rows = np.asarray(out)[mask]  # [n, d]: sequence-major, then position
            first = max(0, start - done)
            writer.append(rows[first : max(first, last)])
        bar.update(last - max(0, skip - done))
        done += n
        bar.set_postfix_str(f"{computed_tokens / max(time.perf_counter() - t0, 1e-9):,.0f} model tok/s", refresh=False)
        if max_rows is not None and done >= max_rows:
            break
    bar.close()
    seconds = time.perf_counter() - t0
    written = [w.rows_written + w.buffered_rows for w in writers]
    if len(set(written)) != 1:  # cannot happen unless a store was written by something else; never close them then
        counts = {w.path: n for w, n in zip(writers, written, strict=True)}
        raise RuntimeError(f"stores ended with different row counts: {counts}")
    for writer in writers:
        writer.close()
    return {
        "rows": written[0],
        "skipped_rows": skip,
        "resumed_from": resume_at,
        "sequences": sequences,
        "seconds": seconds,
        "tokens_per_s": computed_tokens / max(seconds, 1e-9),
    }
