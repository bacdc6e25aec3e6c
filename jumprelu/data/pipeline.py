"""The Grain pipeline that feeds the train step, and its checkpointable position.

Element k of the Grain `MapDataset` is this process's rows of global batch k, read
from the `BatchStream`. `to_iter_dataset` reads ahead on background threads (the copies
out of memory maps release the GIL), keeping `prefetch_batches` batches ready. The
iterator's state is just the next batch index; it is saved inside each orbax
checkpoint (item `data`) and restored with it.
"""

from __future__ import annotations

import json

import grain
import numpy as np

from jumprelu.data.stream import BatchStream


class _ProcessBatches:
    """Grain random-access source: element k = rows `part` of global batch k."""

    def __init__(self, stream: BatchStream, batch_size: int, part: slice, num_batches: int):
        self.stream, self.batch_size, self.part, self.num_batches = stream, batch_size, part, num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, step: int) -> np.ndarray:
        return self.stream.batch(int(step), self.batch_size, self.part)


def batch_iterator(
    stream: BatchStream,
    *,
    batch_size: int,
    part: slice,
    num_batches: int,
    start: int = 0,
    read_threads: int = 2,
    prefetch_batches: int = 4,
):
    """A Grain iterator over this process's share of global batches [start, num_batches)."""
    dataset = grain.MapDataset.source(_ProcessBatches(stream, batch_size, part, num_batches))
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)
    iterator = iter(dataset.to_iter_dataset(options))
    iterator.set_state({"next_index": start})
    return iterator


def next_index(iterator) -> int:
    return int(iterator.get_state()["next_index"])


class IteratorSnapshot:
    """The iterator's state frozen now, for an asynchronous checkpoint save.

    Grain's orbax handler calls `get_state()` when it writes, which with async saves can
    be after the loop has moved on; this object answers with the state at save time.
    """

    def __init__(self, iterator):
        self._state = json.dumps(iterator.get_state()).encode()

    def get_state(self) -> bytes:
        return self._state
