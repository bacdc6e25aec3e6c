"""Activations held as one array: an in-memory array or a memory-mapped `.npy` file.

Training batches are a pure function of the step index: the rows not held out are
visited in a fresh seeded permutation each epoch, and batch k is positions
[k·B, (k+1)·B) of that endless stream. Resuming at step k therefore sees exactly the
batches an uninterrupted run would have seen, with no iterator state to save.
"""

from __future__ import annotations

import os

import numpy as np


class DataError(ValueError):
    """Data that cannot be trained on; the message names the file and the problem."""


def load_npy(path: str, chunk_rows: int = 65536) -> np.ndarray:
    """Opens a `.npy` of shape [N, d] read-only and checks it: float dtype, finite rows.

    Returns a memory map; nothing is copied.
    """
    if not os.path.isfile(path):
        raise DataError(f"data.source {path}: no such file")
    try:
        rows = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"data.source {path}: not a readable .npy file ({e})") from None
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] == 0:
        raise DataError(
            f"data.source {path}: expected shape [N, d_model] with N, d_model > 0, found {list(rows.shape)}"
        )
    if not np.issubdtype(rows.dtype, np.floating):
        raise DataError(f"data.source {path}: expected float activations, found dtype {rows.dtype}")
    bad, first = 0, None
    for start in range(0, rows.shape[0], chunk_rows):
        ok = np.isfinite(rows[start : start + chunk_rows]).all(axis=1)
        if not ok.all():
            bad += int((~ok).sum())
            first = first if first is not None else start + int(np.argmin(ok))
    if bad:
        raise DataError(f"data.source {path}: {bad} rows hold NaN or Inf (first at row {first})")
    return rows


class ArraySource:
    """Shuffled training batches and a held-out evaluation split over one [N, d] array."""

    def __init__(self, rows: np.ndarray, *, eval_rows: int, seed: int, name: str):
        n = rows.shape[0]
        if eval_rows >= n:
            raise DataError(f"data.source {name}: data.eval_rows={eval_rows} leaves no training rows (N={n})")
        self.rows, self.name, self.seed = rows, name, seed
        split = np.random.default_rng([seed, 0]).permutation(n)
        # Sorted index lists keep reads of a memory map as sequential as a shuffle allows.
        self.eval_index = np.sort(split[:eval_rows])
        self.train_index = np.sort(split[eval_rows:])
        self._epoch_cache: dict[int, np.ndarray] = {}

    @property
    def d_model(self) -> int:
        return int(self.rows.shape[1])

    @property
    def num_train_rows(self) -> int:
        return int(self.train_index.shape[0])

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._epoch_cache:
            if len(self._epoch_cache) > 2:
                self._epoch_cache.pop(min(self._epoch_cache))
            perm = np.random.default_rng([self.seed, 1, epoch]).permutation(self.num_train_rows)
            self._epoch_cache[epoch] = self.train_index[perm]
        return self._epoch_cache[epoch]

    def batch_indices(self, step: int, batch_size: int) -> np.ndarray:
        """Row indices of training batch `step`: [batch_size] int64."""
        n = self.num_train_rows
        pos = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(pos, n)
        out = np.empty(batch_size, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._epoch_order(int(e))[offsets[sel]]
        return out

    def batch(self, step: int, batch_size: int, part: slice = slice(None)) -> np.ndarray:
        """Rows `part` of training batch `step` (all of it by default): [n, d_model] float32.

        Each process of a multi-host run reads only its own part of the global batch.
        """
        return np.asarray(self.rows[self.batch_indices(step, batch_size)[part]], np.float32)

    def eval_set(self) -> np.ndarray:
        """The held-out rows: [eval_rows, d_model] float32."""
        return np.asarray(self.rows[self.eval_index], np.float32)

    def sample(self, num_rows: int) -> np.ndarray:
        """A seeded random sample of training rows, for estimating the input scale."""
        k = min(num_rows, self.num_train_rows)
        pick = np.random.default_rng([self.seed, 2]).choice(self.num_train_rows, k, replace=False)
        return np.asarray(self.rows[self.train_index[np.sort(pick)]], np.float32)


def estimate_scale(sample: np.ndarray) -> float:
    """C with E‖x/C‖² = 1 on the sample: sqrt(mean ‖x‖²), in float64 for accuracy."""
    sq = np.sum(np.square(sample, dtype=np.float64), axis=1)
    c = float(np.sqrt(np.mean(sq)))
    if not np.isfinite(c) or c <= 0:
        raise DataError(f"cannot estimate the input scale: mean squared norm of the sample is {c**2}")
    return c
