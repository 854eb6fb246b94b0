"""LRU with a compiled step: the victim is the least recently touched candidate.

LRU keeps its resident keys in a recency queue (`harness.cache.queues`): a touch moves a key to the newest
end, and the victim is the oldest key the step does not need (`renew`, `forget`, `oldest`), found in a step or
two where a scan of every resident key's stamp took one step a slot (a global cache of 256 slots replayed 3.5
million accesses a second). These jitted functions are called by the policy's per-key hooks (the live engine,
and any step the compiled loop does not take) and by `replay_group`, the compiled replay of a whole stream of
one cache group's steps, which the simulator uses: one implementation of the policy, whichever path runs it.
(LFU, once a scan beside it, is a compiled policy on a heap: `harness.cache.policies.lfu`.)

The functions are compiled with numba (`harness.cache.jit`) for their one signature when this module is
imported (cached on disk after the first time), so that no compilation pause falls inside a measured run.

The other policies replay through `harness.cache.compiled`, whose `drive` takes this module's `GroupReplay`.
"""

from __future__ import annotations

from collections.abc import Iterator, Set
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np

from harness.cache.base import CachePolicy
from harness.cache.jit import KERNEL, njit
from harness.cache.queues import NONE, leave, move_to_newest, oldest_unmarked
from harness.keys import ExpertKey

try:
    from numba import types
except ImportError:
    types = None  # type: ignore[assignment]


class GroupReplay(NamedTuple):
    """The arrays a compiled replay of one cache group's steps reads and writes (`replay_group`, and
    `harness.cache.compiled.drive`), built by `ExpertCacheBook`. Key positions index the policy's arrays."""

    keys: np.ndarray
    """Key positions of every call's keys: call c's are keys[bounds[c]:bounds[c + 1]] (distinct)."""
    bounds: np.ndarray
    nows: np.ndarray
    """Each call's token step."""
    calls: np.ndarray
    """The group's call indices, in order."""
    slot_of: np.ndarray
    """Key position -> slot (of the whole pool), -1 if not resident."""
    key_of_slot: np.ndarray
    """Slot - first_slot -> key position, -1 if free."""
    first_slot: int
    free: np.ndarray
    """Free slots: free[:n_free[0]], taken from the end."""
    n_free: np.ndarray
    mark: np.ndarray
    """Per key position: the tag (call + 1) of the last call that needed it."""
    hits: np.ndarray
    """Per call (all calls, not only the group's): hits and misses, written by the replay."""
    misses: np.ndarray


_ARRAY = types.int64[::1] if types is not None else None
GROUP_REPLAY = types.NamedTuple([_ARRAY] * 6 + [types.int64] + [_ARRAY] * 5, GroupReplay) if types is not None else None
"""The numba type of a `GroupReplay`: C-contiguous int64 arrays (a tuple's arrays are not converted)."""


@contextmanager
def only(marks: np.ndarray, at: np.ndarray) -> Iterator[np.ndarray]:
    """`marks` (all 1) with the positions `at` at 0 for the duration: a kernel that skips the keys marked 1 (tag 1)
    sees the candidates `at` only (a hook's victim or admission, where the replay marks the step's own keys)."""
    marks[at] = 0
    try:
        yield marks
    finally:
        marks[at] = 1


QUEUE_SIG = types.none(types.int64[:], types.int64[:, :], types.int64) if types is not None else None
OLDEST_SIG = types.int64(types.int64[:], types.int64[:, :], types.int64[:], types.int64) if types is not None else None
LINKS = 0
"""A position's row in LRU's `links` holds its queue links from column 0 (`queues`: which queue, 0 or NONE, its
older and its newer neighbour)."""


@njit(QUEUE_SIG, **KERNEL, inline="always")
def forget(ends: np.ndarray, links: np.ndarray, key: int) -> None:
    """LRU: `key` leaves the recency queue (if in it)."""
    leave(ends, links, key, LINKS)


@njit(QUEUE_SIG, **KERNEL)
def renew(ends: np.ndarray, links: np.ndarray, key: int) -> None:
    """LRU: `key` moves to (or joins) the newest end of the recency queue."""
    move_to_newest(ends, links, 0, key, LINKS)


@njit(OLDEST_SIG, **KERNEL)
def oldest(ends: np.ndarray, links: np.ndarray, skip: np.ndarray, tag: int) -> int:
    """LRU's victim: the least recently touched key of the queue whose `skip` mark is not `tag`; -1 if none."""
    return oldest_unmarked(ends, links, 0, LINKS, skip, tag)


@njit(
    types.int64(types.int64[:], types.int64[:, :], GROUP_REPLAY, types.int64) if types else None,
    cache=True,
)
def replay_group(ends: np.ndarray, links: np.ndarray, r: GroupReplay, start: int) -> int:
    """Replay r.calls[start:] of one cache group (`GroupReplay`) with nothing staged and every miss admitted, as
    `ExpertCacheBook.account` would: each call's keys (keys[bounds[c]:bounds[c+1]], distinct) are touched
    in order, hits before misses are placed; each miss then takes a free slot (free[:n_free[0]], the last
    first) or else the slot of the least recently touched resident key the call does not need, and is queued
    as the newest (the recency queue `ends` / `links`).
    Counts go to hits[c] / misses[c]. Returns the index of the first call it cannot take (wider than the
    group: the book streams what finds no slot), or len(calls)."""
    keys, bounds, _, calls, slot_of, key_of_slot, first_slot, free, n_free, mark, hits, misses = r
    width_max = 0
    for c in calls:
        width_max = max(width_max, bounds[c + 1] - bounds[c])
    missed = np.empty(width_max, dtype=np.int64)
    capacity = len(key_of_slot)
    for i in range(start, len(calls)):
        c = calls[i]
        a, b = bounds[c], bounds[c + 1]
        if b - a > capacity:
            return i
        tag = c + 1
        m = 0
        for j in range(a, b):
            key = keys[j]
            mark[key] = tag
            if slot_of[key] >= 0:
                renew(ends, links, key)
            else:
                missed[m] = key
                m += 1
        for j in range(m):
            key = missed[j]
            if n_free[0]:
                n_free[0] -= 1
                slot = free[n_free[0]]
            else:
                victim = oldest(ends, links, mark, tag)
                forget(ends, links, victim)
                slot = slot_of[victim]
                slot_of[victim] = -1
            slot_of[key] = slot
            key_of_slot[slot - first_slot] = key
            renew(ends, links, key)
        hits[c] = b - a - m
        misses[c] = m
    return len(calls)


class RecencyPolicy(CachePolicy):
    """Evict the least recently touched candidate (LRU), by its recency queue; see the module docstring."""

    observes_misses = False  # a miss is placed by on_insert; on_access only moves hits

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, seed)
        self.index: dict[ExpertKey, int] = {}
        """Key -> position in the queue's links, in first-seen order (or the order `bind` gave)."""
        self.keys: list[ExpertKey] = []
        """Position -> key."""
        self.ends = np.array([NONE, NONE, 0], dtype=np.int64)
        self.links = np.full((64, 3), NONE, dtype=np.int64)
        """The recency queue of the resident keys (`queues`): its ends and size, each position's links."""
        self._marks = np.ones(64, dtype=np.int64)

    @property
    def slots(self) -> int:
        """Keys the links have room for."""
        return len(self._marks)

    def bind(self, keys: list[ExpertKey]) -> np.ndarray:
        """Positions of `keys` (new ones appended, the links grown), for the compiled replay."""
        index = self.index
        for key in keys:
            if key not in index:
                index[key] = len(index)
                self.keys.append(key)
        if len(index) > self.slots:
            size = max(len(index), 2 * self.slots)
            self.links = np.concatenate([self.links, np.full((size - self.slots, 3), NONE, np.int64)])
            self._marks = np.ones(size, dtype=np.int64)
        return np.array([index[key] for key in keys], dtype=np.int64)

    def _at(self, key: ExpertKey) -> int:
        i = self.index.get(key)
        return int(self.bind([key])[0]) if i is None else i

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        if hit:  # a miss is placed by on_insert
            at = self._at(key)  # first: a new key may grow (replace) the links
            renew(self.ends, self.links, at)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        at = self._at(key)  # first: a new key may grow (replace) the links
        renew(self.ends, self.links, at)

    def on_evict(self, key: ExpertKey, now: int) -> None:
        at = self._at(key)
        forget(self.ends, self.links, at)

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        try:  # candidates are resident, so known; bind would also take new keys, at a Python loop's cost
            at = np.fromiter(map(self.index.__getitem__, candidates), np.int64, len(candidates))
        except KeyError:
            at = self.bind(list(candidates))
        with only(self._marks, at) as marks:
            chosen = oldest(self.ends, self.links, marks, 1)
        if chosen < 0:
            raise AssertionError("victim() called without a resident candidate")
        return self.keys[chosen]

    def replay(self, r: GroupReplay, start: int) -> int:
        """`replay_group` with this policy's queue (the book's call, as `CompiledPolicy.replay`; the order
        ignores the clock `r.nows`)."""
        return replay_group(self.ends, self.links, r, start)
