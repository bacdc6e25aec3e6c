"""Index helpers of the sparse step (`core/sparse.py`), built for XLA:CPU, where `lax.top_k`,
`nonzero` and argsort's (key, index) sort cost a sizeable share of a dense product: the first
set flags of each row of a mask, and a by-latent order of a list of entries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["first_set", "by_latent"]

_WORD = 32  # flags packed per uint32 word


def first_set(cand, slots: int):
    """Per row, the latents of its first `slots` candidates in ascending order (unused slots
    past the row's count hold arbitrary latents) and how many candidates the row has.

    No sort or top-k (XLA:CPU's top_k cost half an encoder product at width 16K): the mask is
    packed into 32-bit words; each nonempty word's first rank (the running popcount before it)
    is marked with the word's index, so a running max over the ranks gives each slot's word,
    and a binary search over the bits of that word finds the bit. The packing and the marks
    are O(rows · M / 32) besides the mask itself, the rest O(rows · slots) (a binary search over
    the words for every slot, before, cost 4× as much at 64K latents and 1,024 slots)."""
    rows, width = cand.shape
    words = -(-width // _WORD)
    cand = jnp.pad(cand, ((0, 0), (0, words * _WORD - width))).reshape(rows, words, _WORD)
    bit = jnp.uint32(1) << jnp.arange(_WORD, dtype=jnp.uint32)
    mask = jnp.sum(jnp.where(cand, bit, jnp.uint32(0)), axis=-1, dtype=jnp.uint32)  # [rows, words]
    in_word = jax.lax.population_count(mask).astype(jnp.int32)
    before = jnp.cumsum(in_word, axis=1)  # candidates through word w
    earlier = before - in_word  # candidates before word w: the rank of its first (from 0)
    first = jnp.where(in_word > 0, earlier, slots)  # an empty word's mark is dropped
    marks = jnp.full((rows, slots), -1, jnp.int32)
    marks = marks.at[jnp.arange(rows)[:, None], first].set(jnp.arange(words, dtype=jnp.int32), mode="drop")
    lo = jnp.maximum(jax.lax.cummax(marks, axis=1), 0)  # the word holding each rank (a row's last past its count)
    rank = jnp.arange(1, slots + 1, dtype=jnp.int32)[None, :]
    word, need = jnp.take_along_axis(mask, lo, axis=1), rank - jnp.take_along_axis(earlier, lo, axis=1)
    blo, bhi = jnp.zeros_like(need), jnp.full_like(need, _WORD - 1)
    for _ in range(5):  # lowest bit b with popcount(word & bits 0..b) >= need
        mid = (blo + bhi) // 2
        upto = word & ((jnp.uint32(2) << mid.astype(jnp.uint32)) - jnp.uint32(1))
        enough = jax.lax.population_count(upto).astype(jnp.int32) >= need
        blo, bhi = jnp.where(enough, blo, mid + 1), jnp.where(enough, mid, bhi)
    return jnp.minimum(lo * _WORD + blo, width - 1), before[:, -1]


def by_latent(lat, valid, width: int, chunk: int):
    """(order, latents in that order, padding = width): a permutation of the entries under which
    every chunk (`chunk` entries; the entries are whole chunks) is sorted by latent and the
    valid entries (a prefix) stay a prefix.

    What the scatter-adds need is sorted chunks, not one global order, so blocks of whole
    chunks are sorted separately, each by a single uint32 key (latent above, position in the
    block below): a key-only sort, 4-5× faster on XLA:CPU than argsort's (key, index) sort.
    Sorting within blocks keeps the prefix: a block holds valid entries first, and its padding
    sorts last. Widths too large for such blocks fall back to a global argsort."""
    total = lat.shape[0]
    key = jnp.where(valid, lat, width)
    pos_bits = 32 - width.bit_length()  # what is left of 32 bits for the position in a block
    size = min(chunk, total)
    chunks = total // size
    fits = [c for c in range(1, chunks + 1) if chunks % c == 0 and c * size <= 2**pos_bits]
    if not fits:
        order = jnp.argsort(key)
        return order, key[order]
    block = max(fits) * size
    packed = (key.astype(jnp.uint32) << pos_bits) | (jnp.arange(total, dtype=jnp.uint32) % block)
    packed = jnp.sort(packed.reshape(-1, block), axis=-1).reshape(-1)
    start = jnp.arange(total, dtype=jnp.int32) // block * block
    order = (packed & jnp.uint32(2**pos_bits - 1)).astype(jnp.int32) + start
    return order, (packed >> pos_bits).astype(jnp.int32)
