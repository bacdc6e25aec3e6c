"""The harvest loop: packed sequences -> site activations -> kept rows -> the activation store.

Independent of the model: `activations(tokens [n, T]) -> [n, T, d]` is the site function.
Rows are appended sequence by sequence, position by position, so the store's row r is a pure
function of the sources, the tokenizer and the model. That makes resuming exact: the writer
reports how many rows its complete shards hold, and the loop skips exactly that many rows
(recomputing at most one batch) before appending again. Nothing is duplicated or lost,
whatever the batch size of the resumed run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
from tqdm import tqdm

from jumprelu.harvest import text as text_lib
from jumprelu.store import StoreWriter


def collect(
    seqs: Iterator[np.ndarray],
    activations: Callable[[np.ndarray], np.ndarray],
    writer: StoreWriter,
    special: text_lib.SpecialIds,
    batch_sequences: int,
    max_rows: int | None = None,
    progress: bool = True,
) -> dict:
    """Fills `writer` and closes it; returns {rows, skipped_rows, sequences, seconds, tokens_per_s}."""
    resume_at = writer.rows_written
    done = 0  # rows of the sequences walked so far (stored before or now)
    computed_tokens, t0 = 0, time.perf_counter()
    bar = tqdm(total=max_rows, initial=resume_at, unit="tok", unit_scale=True, disable=not progress, mininterval=1.0)
    sequences = 0
    for _, tokens in text_lib.batches(seqs, batch_sequences, special):
        mask = text_lib.keep_mask(tokens, special)
        n = int(mask.sum())
        sequences += int((tokens != special.pad).any(axis=1).sum())
        if done + n <= resume_at:  # every row of this batch is already in complete shards
            done += n
            continue
        rows = np.asarray(activations(tokens))[mask]  # [n, d]: sequence-major, then position
        computed_tokens += int(tokens.size)
        rows = rows[max(0, resume_at - done) :]
        if max_rows is not None:
            rows = rows[: max(0, max_rows - max(done, resume_at))]
        writer.append(rows)
        done += n
        bar.update(len(rows))
        bar.set_postfix_str(f"{computed_tokens / max(time.perf_counter() - t0, 1e-9):,.0f} model tok/s", refresh=False)
        if max_rows is not None and done >= max_rows:
            break
    bar.close()
    seconds = time.perf_counter() - t0
    written = writer.rows_written + writer.buffered_rows
    writer.close()
    return {
        "rows": written,
        "skipped_rows": resume_at,
        "sequences": sequences,
        "seconds": seconds,
        "tokens_per_s": computed_tokens / max(seconds, 1e-9),
    }
