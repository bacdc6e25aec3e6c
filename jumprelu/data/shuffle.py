"""A seeded shuffle buffer over an endless row producer: training without an activation store.

A `RowProducer` (the language model's forward pass in `jumprelu.harvest.onthefly`) yields rows
in a fixed order, chunk by chunk (one chunk per LM batch). The buffer cuts that row sequence
into windows of W = `data.shuffle_buffer_rows` rows and permutes each window with a
permutation seeded by (seed, window): training row p is row perm_w[p mod W] of window
w = p // W, and global batch k is rows [k·B, (k+1)·B). A batch thus mixes rows from W
consecutive producer rows (W / seq_len sequences) instead of the store's whole dataset.

The rows are a pure function of (producer, W, seed, position), so resuming needs no buffer
contents: the checkpointed state is the next batch index plus where its window begins among
the producer's chunks (chunk g, rows of it to skip). A restore recomputes that one window
(one window of LM forward), and every later batch is bit-identical to an unbroken run's.
A state without the cursor is located by replaying only the chunk sizes (the tokenizer, not
the model). While the step trains on window w, one background thread fills window w+1.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from collections.abc import Iterator
from typing import Protocol

import numpy as np


class RowProducer(Protocol):
    d_model: int

    def chunks(self, start: int) -> Iterator[np.ndarray]:
        """Rows [n_g, d_model] float32 of chunk start, start+1, ... (endless)."""

    def chunk_sizes(self) -> Iterator[int]:
        """n_0, n_1, ... without computing rows (endless)."""


class ShuffleBuffer:
    def __init__(self, producer: RowProducer, window_rows: int, seed: int):
        self.producer, self.window_rows, self.seed = producer, int(window_rows), int(seed)
        self.d_model = producer.d_model
        self._starts: dict[int, tuple[int, int]] = {0: (0, 0)}  # window -> (chunk, rows of it to skip)
        self._live = None  # where the worker's producer iterator stands: [window, iterator, chunk, rows, offset]
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jumprelu-shuffle")
        self._futures: dict[int, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self.end: int | None = None  # rows the run will read: no window past them is prefetched

    def start_of(self, window: int) -> tuple[int, int]:
        """(chunk, skip) where `window` begins: recorded when its predecessor was filled, else located."""
        if window not in self._starts:
            self._starts[window] = self._locate(window)
        return self._starts[window]

    def seek(self, window: int, start: tuple[int, int] | None) -> None:
        """Forgets prefetched windows; `window` begins at `start` (else it is located when needed)."""
        with self._lock:
            self._futures.clear()
        if start is not None:
            self._starts[window] = (int(start[0]), int(start[1]))

    def _locate(self, window: int) -> tuple[int, int]:
        target, seen = window * self.window_rows, 0
        for g, n in enumerate(self.producer.chunk_sizes()):
            if seen + n > target:
                return g, target - seen
            seen += n
        raise AssertionError("chunk_sizes ended")  # endless by contract

    def _fill(self, window: int) -> np.ndarray:
        """Window `window`'s rows, permuted. Runs on the one worker thread, so fills never interleave."""
        live = self._live
        if live is None or live[0] != window:  # not the continuation of the previous fill: start afresh
            g, skip = self.start_of(window)
            live = [window, self.producer.chunks(g), g, None, skip]
        _, chunks, g, rows, offset = live
        out = np.empty((self.window_rows, self.d_model), np.float32)
        at = 0
        while at < self.window_rows:
            if rows is None:
                rows = next(chunks)  # chunk g
            take = min(self.window_rows - at, len(rows) - offset)
            out[at : at + take] = rows[offset : offset + take]
            at, offset = at + take, offset + take
            if offset == len(rows):
                g, rows, offset = g + 1, None, 0
        self._starts[window + 1] = (g, offset)
        self._live = [window + 1, chunks, g, rows, offset]
        perm = np.random.default_rng([self.seed, window]).permutation(self.window_rows)
        return out[perm]

    def prefetch(self, w: int) -> concurrent.futures.Future:
        """Starts filling window w (unless under way); windows before w are dropped."""
        with self._lock:
            for old in [k for k in self._futures if k < w]:
                del self._futures[old]  # consumed: their memory goes
            if w not in self._futures:
                self._futures[w] = self._pool.submit(self._fill, w)
            return self._futures[w]

    def window(self, w: int) -> np.ndarray:
        """Window w's shuffled rows [W, d_model]; starts filling window w+1 in the background."""
        future = self.prefetch(w)
        with self._lock:
            wanted = self.end is None or (w + 1) * self.window_rows < self.end
            if wanted and w + 1 not in self._futures:
                self._futures[w + 1] = self._pool.submit(self._fill, w + 1)
        return future.result()

    def read(self, position: int, count: int) -> np.ndarray:
        """Training rows [position, position + count): [count, d_model] float32."""
        out = np.empty((count, self.d_model), np.float32)
        at = 0
        while at < count:
            w, offset = divmod(position + at, self.window_rows)
            take = min(count - at, self.window_rows - offset)
            out[at : at + take] = self.window(w)[offset : offset + take]
            at += take
        return out

    def close(self) -> None:
        with self._lock:
            self._futures.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)  # a fill under way finishes first


class BufferBatches:
    """This process's rows of global batches [start, num_batches), with a checkpointable state.

    Stands where the store path's Grain iterator stands: `next`, `get_state` / `set_state`
    (saved in each orbax checkpoint's `data` item by Grain's handler, which hands `set_state`
    the JSON bytes), `start_prefetch`.
    """

    def __init__(self, buffer: ShuffleBuffer, *, batch_size: int, part: slice, num_batches: int, start: int = 0):
        self.buffer, self.batch_size, self.num_batches = buffer, batch_size, num_batches
        self._lo, self._hi, _ = part.indices(batch_size)
        self._next = start
        buffer.end = num_batches * batch_size

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self._next >= self.num_batches:
            raise StopIteration
        rows = self.buffer.read(self._next * self.batch_size + self._lo, self._hi - self._lo)
        self._next += 1
        return rows

    def get_state(self) -> dict:
        window = self._next * self.batch_size // self.buffer.window_rows
        chunk, skip = self.buffer.start_of(window)
        return {"next_index": self._next, "window": window, "chunk": chunk, "skip": skip}

    def set_state(self, state) -> None:
        if isinstance(state, bytes):
            state = json.loads(state.decode())
        self._next = int(state["next_index"])
        window = self._next * self.batch_size // self.buffer.window_rows
        if state.get("window") == window:
            self.buffer.seek(window, (state["chunk"], state["skip"]))
        else:  # a state without the cursor: located from the chunk sizes
            self.buffer.seek(window, None)

    def start_prefetch(self) -> None:
        """Starts filling the next batch's window (Grain's handler calls this after a restore)."""
        if self._next < self.num_batches:
            self.buffer.prefetch(self._next * self.batch_size // self.buffer.window_rows)
