"""The static sizes of the sparse step (`core/sparse.py`): the candidate slots per row, the
entries kept over a batch and the rows spilled to the dense path, fixed at compile time."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Capacity:
    """Static sizes of the sparse step. A batch overflows (and takes the dense path) when more
    than `spill` rows exceed `per_row` candidates or the other rows hold more than `per_batch`."""

    per_row: int  # candidate slots per row
    per_batch: int  # entries kept over the batch (rows within per_row)
    spill: int  # rows beyond per_row, each computed densely

    @classmethod
    def for_batch(cls, per_row: int, batch: int, width: int) -> Capacity:
        """per_row slots (≤ width); per_batch: a quarter of the slots, i.e. twice the mean a
        per_row of 8 × L0 allows; spill: 1/64 of the rows (at least 1)."""
        per_row = min(per_row, width)
        return cls(per_row, max(1, batch * per_row // 4), max(1, batch // 64))


def default_capacity(target_l0: float, width: int) -> int:
    """Top-k slots per row when sae.sparse_capacity is 0: 8 × the target L0 and at least width/64
    (the per-row L0 is heavy-tailed, more so the wider the SAE; rows beyond the slots spill to
    the dense path), a multiple of 8, ≤ width."""
    return min(width, max(8 * math.ceil(8 * target_l0 / 8), width // 64))
