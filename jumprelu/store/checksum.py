"""Per-block CRC-32 checksums of shard rows: written by the writer, checked by the reader.

Each shard's rows are cut into blocks of `block_rows` rows (about BLOCK_BYTES each; the
last block of a shard may be shorter) and metadata.json records one CRC-32 per block of
the bytes the .npy file holds after its header. Blocks rather than whole shards, so that a
disagreement names a row range and a start-up check can read a few random blocks instead
of the whole store. CRC-32 is zlib's (stdlib, ~1 GB/s): it is there to catch changed bytes
(bit rot, partial copies, stray writers), not tampering.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import numpy as np

ALGORITHM = "crc32"
BLOCK_BYTES = 16 << 20
# Blocks read by the check every training start makes (`open_store(sample_blocks=...)`): at
# most 64 MiB, a fraction of a second from page cache or a local disk.
START_SAMPLE_BLOCKS = 4


def block_rows(row_bytes: int) -> int:
    return max(1, BLOCK_BYTES // row_bytes)


def block_ranges(rows: int, per_block: int) -> list[tuple[int, int]]:
    """[lo, hi) row ranges of the blocks of a shard of `rows` rows."""
    return [(lo, min(lo + per_block, rows)) for lo in range(0, rows, per_block)] or [(0, 0)]


def crc(rows: np.ndarray) -> int:
    """CRC-32 of a C-contiguous block of rows in their file dtype (float32 or bfloat16's uint16 bits)."""
    return zlib.crc32(np.ascontiguousarray(rows).view(np.uint8).reshape(-1))


def block_checksums(rows: np.ndarray, per_block: int) -> list[int]:
    """One CRC-32 per block of `rows` [n, d] (in the file dtype)."""
    return [crc(rows[lo:hi]) for lo, hi in block_ranges(rows.shape[0], per_block)]


def mismatches(rows: np.ndarray, expected: list[int], per_block: int, blocks: Iterable[int]):
    """(block, lo, hi, found crc, expected crc) for each block in `blocks` whose CRC differs."""
    ranges = block_ranges(rows.shape[0], per_block)
    out = []
    for b in blocks:
        lo, hi = ranges[b]
        found = crc(rows[lo:hi])
        if found != expected[b]:
            out.append((b, lo, hi, found, expected[b]))
    return out
