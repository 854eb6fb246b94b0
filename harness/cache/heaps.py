"""A binary min-heap of keys over numpy arrays, for compiled policies that evict the lowest rank, where a key's
rank changes only when the key itself is touched (`lfu`, LeCaR's LFU expert, `lrfu`, `lrfu-admit`, `fwlru`).

A key's rank is three ints, compared in order; the policy makes them distinct (a stamp that ticks at every
touch, or the key's (layer, expert) code last), so the lowest is unique and the heap's choice is the one a scan
of every key would make. A float value ranks by `sortable(value)`. The heap lives in the int globals from `at`:
its size, its room, then `room` entries of four words (the key's row and its rank: sifting compares adjacent
words, not the rows of the keys), then `room` words of scratch for `lowest_unmarked`. A key's place in it is its
int column `place` (NONE: not in the heap). A change of a key's rank, an insert and a removal cost O(log n)
comparisons; the victim is the root, or close to it (`lowest_unmarked`).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from harness.cache.compiled import EXPERT, LAYER, CompiledPolicy, GroupReplay
from harness.cache.jit import KERNEL, njit
from harness.cache.queues import NONE
from harness.keys import ExpertKey

try:
    from numba import types
except ImportError:  # njit is the identity (harness.cache.jit)
    types = None  # type: ignore[assignment]

HEAP_SIZE, HEAP_ROOM, HEAP_FULL, HEAP_ENTRIES = 0, 1, 2, 3
"""Offsets from the heap's first global: how many keys it holds, how many it has room for, 1 where a put found
it full (a caller's error: `HeapPolicy` raises), its entries."""
ENTRY = 4
"""Words of an entry: the key's row, then its rank."""
_FLIP = np.int64(0x7FFFFFFFFFFFFFFF)


def heap_globals(room: int) -> list[int]:
    """The int globals of an empty heap with room for `room` keys (entries and scratch)."""
    return [0, room, 0] + [NONE] * ((ENTRY + 1) * room)


@njit(**KERNEL, inline="always")
def sortable(value: float) -> int:
    """An int64 that orders as the float64 `value` does (NaN aside): its bits, with those of a negative value
    flipped below the sign; -0.0 is taken as 0.0 first, as a float comparison takes it."""
    bits = np.float64(value + 0.0).view(np.int64)
    return int(bits if bits >= 0 else bits ^ _FLIP)


@njit(**KERNEL, inline="always")
def key_code(ki: np.ndarray, key: int) -> int:
    """The key's (layer, expert) as one int, in their order: the last tie-break of a rank."""
    return (ki[key, LAYER] << 32) | ki[key, EXPERT]


@njit(**KERNEL, inline="always")
def _below(g: np.ndarray, a: int, r1: int, r2: int, r3: int) -> bool:
    """The entry at word `a` ranks below (r1, r2, r3)."""
    return g[a + 1] < r1 or (g[a + 1] == r1 and (g[a + 2] < r2 or (g[a + 2] == r2 and g[a + 3] < r3)))


@njit(**KERNEL, inline="always")
def _move(g: np.ndarray, ki: np.ndarray, place: int, to: int, at: int, i: int) -> None:
    """Copy the entry at word `at` to word `to`, position i."""
    g[to], g[to + 1], g[to + 2], g[to + 3] = g[at], g[at + 1], g[at + 2], g[at + 3]
    ki[g[to], place] = i


@njit(**KERNEL, inline="always")
def _sift(g: np.ndarray, ki: np.ndarray, at: int, i: int, place: int, key: int, r1: int, r2: int, r3: int) -> None:
    """Put `key` of rank (r1, r2, r3) at position i, or above or below it, where its rank belongs (the entries it
    passes move into its way)."""
    entries, size = at + HEAP_ENTRIES, g[at + HEAP_SIZE]
    while i > 0:  # up, while it ranks below its parent
        parent = (i - 1) >> 1
        p = entries + ENTRY * parent
        if not (r1 < g[p + 1] or (r1 == g[p + 1] and (r2 < g[p + 2] or (r2 == g[p + 2] and r3 < g[p + 3])))):
            break
        _move(g, ki, place, entries + ENTRY * i, p, i)
        i = parent
    while True:  # down, while a child ranks below it
        child = 2 * i + 1
        if child >= size:
            break
        c = entries + ENTRY * child
        if child + 1 < size and _below(g, c + ENTRY, g[c + 1], g[c + 2], g[c + 3]):
            child += 1
            c += ENTRY
        if not _below(g, c, r1, r2, r3):
            break
        _move(g, ki, place, entries + ENTRY * i, c, i)
        i = child
    q = entries + ENTRY * i
    g[q], g[q + 1], g[q + 2], g[q + 3] = key, r1, r2, r3
    ki[key, place] = i


_RANKED = (types.int64[::1], types.int64[:, ::1], *(types.int64,) * 6) if types is not None else ()


@njit(types.boolean(*_RANKED) if types else None, **KERNEL, inline="always")
def heap_put(g: np.ndarray, ki: np.ndarray, at: int, key: int, place: int, r1: int, r2: int, r3: int) -> bool:
    """`key`'s rank is now (r1, r2, r3): it joins the heap, or moves in it where it is there already. False where
    the heap is full (the key is then not in it, and the heap's full flag is set)."""
    i = ki[key, place]
    if i == NONE:
        i = g[at + HEAP_SIZE]
        if i == g[at + HEAP_ROOM]:
            g[at + HEAP_FULL] = 1
            return False
        g[at + HEAP_SIZE] = i + 1
    _sift(g, ki, at, i, place, key, r1, r2, r3)
    return True


@njit(types.none(*_RANKED) if types else None, **KERNEL, inline="always")
def heap_rerank(g: np.ndarray, ki: np.ndarray, at: int, key: int, place: int, r1: int, r2: int, r3: int) -> None:
    """`key`'s rank is now (r1, r2, r3): restore the order (no-op for a key not in the heap)."""
    if ki[key, place] != NONE:
        _sift(g, ki, at, ki[key, place], place, key, r1, r2, r3)


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
        _sift(g, ki, at, i, place, g[q], g[q + 1], g[q + 2], g[q + 3])


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
            if best == NONE or _below(g, e, g[best + 1], g[best + 2], g[best + 3]):
                best = e
        else:
            for child in (2 * i + 1, 2 * i + 2):
                if child < size:
                    g[stack + depth] = child
                    depth += 1
    return NONE if best == NONE else g[best]


class HeapPolicy(CompiledPolicy):
    """A compiled policy that keeps its resident keys in a heap: its hooks raise where an insert found the heap
    full (more resident keys than the policy's capacity, a caller's error) instead of writing past it."""

    heap_at: ClassVar[int]
    """Where the heap's globals start in `g`."""

    def _check(self) -> None:
        if self.g[self.heap_at + HEAP_FULL]:
            raise AssertionError(f"{self.name}: more resident keys than its {self.capacity} slots")

    def on_insert(self, key: ExpertKey, now: int) -> None:
        super().on_insert(key, now)
        self._check()

    def replay(self, r: GroupReplay, start: int) -> int:
        done = super().replay(r, start)
        self._check()
        return done
