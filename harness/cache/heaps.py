"""A binary min-heap of keys over numpy arrays, for compiled policies that evict the lowest rank (`lfu`).

A key's rank is a pair of ints (a count, then a stamp), compared in that order; the policy keeps the pairs
distinct (a stamp that ticks at every touch), so the lowest is unique and the heap's choice is the one a scan
of every key would make. The heap lives in the int globals from `at`: its size, its room, then `room` entries
of three words (the key's row and its rank: sifting compares adjacent words, not the rows of the keys), then
`room` words of scratch for `lowest_unmarked`. A key's place in it is its int column `place` (NONE: not in the
heap). A change of a key's rank, an insert and a removal cost O(log n) comparisons; the victim is the root, or
close to it (`lowest_unmarked`).
"""

from __future__ import annotations

import numpy as np

from harness.cache.jit import KERNEL, njit
from harness.cache.queues import NONE

try:
    from numba import types
except ImportError:  # njit is the identity (harness.cache.jit)
    types = None  # type: ignore[assignment]

HEAP_SIZE, HEAP_ROOM, HEAP_ENTRIES = 0, 1, 2
"""Offsets from the heap's first global: how many keys it holds, how many it has room for, its entries."""
ENTRY = 3
"""Words of an entry: the key's row, its count, its stamp."""


def heap_globals(room: int) -> list[int]:
    """The int globals of an empty heap with room for `room` keys (entries and scratch)."""
    return [0, room] + [NONE] * ((ENTRY + 1) * room)


@njit(**KERNEL, inline="always")
def _below(g: np.ndarray, a: int, b: int) -> bool:
    """The entry at word `a` ranks below the entry at word `b`."""
    return g[a + 1] < g[b + 1] or (g[a + 1] == g[b + 1] and g[a + 2] < g[b + 2])


@njit(**KERNEL, inline="always")
def _sift(g: np.ndarray, ki: np.ndarray, at: int, i: int, place: int, key: int, count: int, stamp: int) -> None:
    """Put `key` of rank (count, stamp) at position i, or above or below it, where its rank belongs (the entries
    it passes move into its way)."""
    entries, size = at + HEAP_ENTRIES, g[at + HEAP_SIZE]
    while i > 0:  # up, while it ranks below its parent
        parent = (i - 1) >> 1
        p = entries + ENTRY * parent
        if not (count < g[p + 1] or (count == g[p + 1] and stamp < g[p + 2])):
            break
        q = entries + ENTRY * i
        g[q], g[q + 1], g[q + 2] = g[p], g[p + 1], g[p + 2]
        ki[g[q], place] = i
        i = parent
    while True:  # down, while a child ranks below it
        child = 2 * i + 1
        if child >= size:
            break
        c = entries + ENTRY * child
        if child + 1 < size and _below(g, c + ENTRY, c):
            child += 1
            c += ENTRY
        if not (g[c + 1] < count or (g[c + 1] == count and g[c + 2] < stamp)):
            break
        q = entries + ENTRY * i
        g[q], g[q + 1], g[q + 2] = g[c], g[c + 1], g[c + 2]
        ki[g[q], place] = i
        i = child
    q = entries + ENTRY * i
    g[q], g[q + 1], g[q + 2] = key, count, stamp
    ki[key, place] = i


_RANKED = (
    (types.int64[::1], types.int64[:, ::1], types.int64, types.int64, types.int64, types.int64, types.int64)
    if types is not None
    else ()
)


@njit(types.none(*_RANKED) if types else None, **KERNEL, inline="always")
def heap_push(g: np.ndarray, ki: np.ndarray, at: int, key: int, place: int, count: int, stamp: int) -> None:
    """Add `key` (not in the heap, which has room for it) with rank (count, stamp)."""
    g[at + HEAP_SIZE] += 1
    _sift(g, ki, at, g[at + HEAP_SIZE] - 1, place, key, count, stamp)


@njit(types.none(*_RANKED) if types else None, **KERNEL, inline="always")
def heap_rerank(g: np.ndarray, ki: np.ndarray, at: int, key: int, place: int, count: int, stamp: int) -> None:
    """`key`'s rank is now (count, stamp): restore the order (no-op for a key not in the heap)."""
    if ki[key, place] != NONE:
        _sift(g, ki, at, ki[key, place], place, key, count, stamp)


@njit(
    types.none(types.int64[::1], types.int64[:, ::1], types.int64, types.int64, types.int64) if types else None,
    **KERNEL,
    inline="always",
)
def heap_remove(g: np.ndarray, ki: np.ndarray, at: int, key: int, place: int) -> None:
    """Take `key` out of the heap (no-op for a key not in it): the last entry fills its place."""
    i = ki[key, place]
    if i == NONE:
        return
    ki[key, place] = NONE
    last = g[at + HEAP_SIZE] - 1
    g[at + HEAP_SIZE] = last
    if i < last:
        q = at + HEAP_ENTRIES + ENTRY * last
        _sift(g, ki, at, i, place, g[q], g[q + 1], g[q + 2])


@njit(
    types.int64(types.int64[::1], types.int64, types.int64[:], types.int64) if types else None,
    **KERNEL,
    inline="always",
)
def lowest_unmarked(g: np.ndarray, at: int, mark: np.ndarray, tag: int) -> int:
    """The lowest-ranked key whose mark is not `tag`; NONE if none. The root where it is unmarked; else the
    lowest of the unmarked entries met from the root down through marked ones (an unmarked entry ranks below
    everything beneath it): a walk of about 2m + 1 entries for m marked ones near the top."""
    entries, size = at + HEAP_ENTRIES, g[at + HEAP_SIZE]
    if size and mark[g[entries]] != tag:
        return g[entries]
    stack = entries + ENTRY * g[at + HEAP_ROOM]
    best, depth = NONE, 0
    if size:
        g[stack] = 0
        depth = 1
    while depth:
        depth -= 1
        i = g[stack + depth]
        e = entries + ENTRY * i
        if mark[g[e]] != tag:
            if best == NONE or _below(g, e, best):
                best = e
        else:
            for child in (2 * i + 1, 2 * i + 2):
                if child < size:
                    g[stack + depth] = child
                    depth += 1
    return NONE if best == NONE else g[best]
