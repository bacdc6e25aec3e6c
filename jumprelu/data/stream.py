"""The training stream over a store: a pure function of (position, seed).

Every store row is cut into pieces of at most `block_rows` adjacent rows (skipping
rows left out for NaN/Inf). A seeded draw of pieces forms the held-out split. Epoch e
is the remaining pieces in a fresh seeded permutation, concatenated; the stream is
epoch 0, epoch 1, ... without gaps, and global batch k is stream positions
[k·B, (k+1)·B). So every training row appears exactly once per epoch, pieces from all
shards mix globally, and reads are copies of contiguous rows from memory maps.

Since the writer shuffles rows within each shard, a piece is already a random sample
of its shard's rows; a batch of B rows mixes B / block_rows pieces from anywhere in
the store. Because batch k does not depend on how many processes read it, a run can
resume on a different number of hosts and still see the same batches.
"""

from __future__ import annotations

import threading

import numpy as np

from jumprelu.errors import DataError
from jumprelu.store import Store


def _pieces(lengths: list[int], bad_rows: list[np.ndarray], block_rows: int):
    """(shard, start, length) int64 arrays covering every good row once, in store order."""
    shards, starts, sizes = [], [], []
    for s, (n, bad) in enumerate(zip(lengths, bad_rows, strict=False)):
        edges = np.concatenate([[-1], np.unique(bad), [n]])
        for lo, hi in zip(edges[:-1] + 1, edges[1:], strict=False):  # runs of good rows between bad ones
            begin = np.arange(lo, hi, block_rows, dtype=np.int64)
            shards.append(np.full(begin.shape, s, np.int64))
            starts.append(begin)
            sizes.append(np.minimum(begin + block_rows, hi) - begin)
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
    return cat(shards), cat(starts), cat(sizes)


class BatchStream:
    def __init__(self, store: Store, *, eval_rows: int, seed: int, block_rows: int):
        self.store, self.seed = store, seed
        shard, start, size = _pieces(store.shard_rows, store.bad_rows, max(1, block_rows))
        good = int(size.sum())
        if eval_rows >= good:
            raise DataError(
                f"store {store.path}: data.eval_rows={eval_rows} leaves no training rows ({good} usable rows)"
            )
        # Held-out split: whole pieces in a seeded order; the last one split at the exact count.
        order = np.random.default_rng([seed, 0]).permutation(len(size))
        take = int(np.searchsorted(np.cumsum(size[order]), eval_rows))  # pieces wholly or partly held out
        held = order[: take + 1] if eval_rows else order[:0]
        short = int(size[held].sum()) - eval_rows  # rows of the last held piece that stay in training
        eval_size = size[held].copy()
        if len(held):
            eval_size[-1] -= short
        self._eval = (shard[held], start[held], eval_size)
        keep = np.ones(len(size), bool)
        keep[held] = False
        train = [shard[keep], start[keep], size[keep]]
        if short > 0:
            last = held[-1]
            train = [
                np.append(train[0], shard[last]),
                np.append(train[1], start[last] + size[last] - short),
                np.append(train[2], short),
            ]
        self._train = tuple(train)
        self.num_train_rows = int(self._train[2].sum())
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    @property
    def d_model(self) -> int:
        return self.store.d_model

    @property
    def dtype(self) -> str:
        """The dtype batches arrive in: the store's."""
        return self.store.dtype

    @property
    def scale(self) -> float:
        """C with E‖x/C‖² = 1, computed by the writer over every finite row."""
        return self.store.scale

    def close(self) -> None:
        """Nothing to release: the store's memory maps close with it."""

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(piece order, cumulative row counts with a leading 0) of one epoch."""
        with self._lock:
            if epoch not in self._epochs:
                if len(self._epochs) >= 3:
                    self._epochs.pop(min(self._epochs))
                order = np.random.default_rng([self.seed, 1, epoch]).permutation(len(self._train[2]))
                ends = np.concatenate([[0], np.cumsum(self._train[2][order])])
                self._epochs[epoch] = (order, ends)
            return self._epochs[epoch]

    def _copy(self, pieces, lo: int, hi: int, out: np.ndarray) -> None:
        """Copies rows [lo, hi) of the concatenation of `pieces` into `out`."""
        order, ends = pieces
        shard, start, _ = self._train
        i = int(np.searchsorted(ends, lo, side="right")) - 1
        at = 0
        while lo < hi:
            p = order[i]
            a, b = lo - ends[i], min(hi, ends[i + 1]) - ends[i]
            out[at : at + b - a] = self.store.rows(int(shard[p]), start[p] + a, start[p] + b)
            at, lo, i = at + b - a, ends[i] + b, i + 1

    def read(self, position: int, count: int) -> np.ndarray:
        """Stream rows [position, position + count): [count, d_model] in the store's dtype."""
        out = np.empty((count, self.d_model), self.store.shard(0).dtype)
        n, at = self.num_train_rows, 0
        while at < count:
            epoch, offset = divmod(position + at, n)
            take = min(count - at, n - offset)
            self._copy(self._epoch(epoch), offset, offset + take, out[at : at + take])
            at += take
        return out

    def batch(self, step: int, batch_size: int, part: slice = slice(None)) -> np.ndarray:
        """Rows `part` of global batch `step` (all of it by default)."""
        lo, hi, _ = part.indices(batch_size)
        return self.read(step * batch_size + lo, hi - lo)

    def eval_index(self) -> np.ndarray:
        """Where each held-out row lives in the store: [eval_rows, 2] int64 (shard, row within the shard)."""
        shard, start, size = self._eval
        parts = [
            np.stack([np.full(n, s), np.arange(a, a + n)], axis=1) for s, a, n in zip(shard, start, size, strict=True)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, 2), np.int64)

    def eval_set(self) -> np.ndarray:
        """The held-out rows: [eval_rows, d_model] float32."""
        shard, start, size = self._eval
        out = np.empty((int(size.sum()), self.d_model), np.float32)
        at = 0
        for s, a, n in zip(shard, start, size, strict=False):
            out[at : at + n] = self.store.rows(int(s), a, a + n)
            at += n
        return out
