"""LRU and LFU with a compiled step: the victim is the least recently touched candidate, or the candidate of
lowest (count, stamp).

LFU keeps, per key it has seen, a lifetime access count and a stamp (the value of a clock that ticks at every
touch: a hit's access, an insert), in one numpy array, and scans the candidates for the lowest (count, stamp)
(`touch`, `lowest`). LRU keeps its resident keys in a recency queue (`harness.cache.queues`): a touch moves a key
to the newest end, and the victim is the oldest key the step does not need (`renew`, `forget`, `oldest`), found
in a step or two where a scan of every resident key's stamp took one step a slot (a global cache of 256 slots
replayed 3.5 million accesses a second). These jitted functions are called by the policy's per-key hooks (the
live engine, and any step the compiled loop does not take) and by `replay_group`, the compiled replay of a
whole stream of one cache group's steps, which the simulator uses: one implementation of each policy,
whichever path runs it.

The functions are compiled with numba (`harness.cache.jit`) for their one signature when this module is
imported (cached on disk after the first time), so that no compilation pause falls inside a measured run.

Any other policy keeps working through the Python hooks: the compiled replay is opt-in, taken only
where every group's policy is a `RankedPolicy`.
"""

from __future__ import annotations

from collections.abc import Iterator, Set
from contextlib import contextmanager
from typing import ClassVar, NamedTuple

import numpy as np

from harness.cache.base import CachePolicy
from harness.cache.jit import KERNEL, njit
from harness.cache.queues import NEWER_LINK, NONE, OLDEST, QUEUE_LINK, push, unlink
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

COUNT, STAMP = 1, 2
"""What `touch` does to a key: bump its lifetime count, renew its stamp (flags, combined with |)."""


@njit("void(int64[:], int64, int64, int64)", cache=True)
def touch(state: np.ndarray, at: int, key: int, how: int) -> None:
    """state[at:] is [clock, stamp_0, count_0, stamp_1, count_1, ...] (an offset, not a view: a view costs
    reference counting, ~20 ns a call, where a policy keeps several such states in one array). An access
    bumps the count where the policy counts (COUNT); a hit's access or an insert renews the stamp to the
    clock, which then ticks."""
    if how & COUNT:
        state[at + 2 + 2 * key] += 1
    if how & STAMP:
        state[at + 1 + 2 * key] = state[at]
        state[at] += 1


@njit("int64(int64[:], int64, boolean, int64[:], int64[:], int64)", cache=True)
def lowest(state: np.ndarray, at: int, counted: bool, keys: np.ndarray, skip: np.ndarray, tag: int) -> int:
    """The key of lowest rank in state[at:] (`touch`), (count, stamp) or stamp alone, among `keys` (those >= 0
    whose `skip` mark is not `tag`); -1 if none."""
    # Selects, not branches: which key ranks lower is a coin toss that the branch predictor loses (a scan
    # 20-40% faster on 16 to 32 keys).
    best, best_count, best_stamp = -1, 0, 0
    for key in keys:
        usable = key >= 0 and skip[key] != tag
        c = state[at + 2 + 2 * key] if counted else 0
        stamp = state[at + 1 + 2 * key]
        lower = usable & ((best < 0) | (c < best_count) | ((c == best_count) & (stamp < best_stamp)))
        best = key if lower else best
        best_count = c if lower else best_count
        best_stamp = stamp if lower else best_stamp
    return best


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
    if links[key, LINKS + QUEUE_LINK] != NONE:
        unlink(ends, links, key, LINKS)


@njit(QUEUE_SIG, **KERNEL)
def renew(ends: np.ndarray, links: np.ndarray, key: int) -> None:
    """LRU: `key` moves to (or joins) the newest end of the recency queue."""
    forget(ends, links, key)
    push(ends, links, 0, key, LINKS)


@njit(OLDEST_SIG, **KERNEL)
def oldest(ends: np.ndarray, links: np.ndarray, skip: np.ndarray, tag: int) -> int:
    """LRU's victim: the least recently touched key of the queue whose `skip` mark is not `tag`; -1 if none.
    The keys a step marks were just touched (or are not resident), so the walk rarely passes one."""
    key = ends[OLDEST]
    while key != NONE and skip[key] == tag:
        key = links[key, LINKS + NEWER_LINK]
    return key


@njit(
    types.int64(
        types.int64[:], types.int64[:], types.int64[:, :], types.boolean, types.boolean, GROUP_REPLAY, types.int64
    )
    if types
    else None,
    cache=True,
)
def replay_group(
    state: np.ndarray,
    ends: np.ndarray,
    links: np.ndarray,
    counted: bool,
    observes_misses: bool,
    r: GroupReplay,
    start: int,
) -> int:
    """Replay r.calls[start:] of one cache group (`GroupReplay`) with nothing staged and every miss admitted, as
    `ExpertCacheBook.account` would: each call's keys (keys[bounds[c]:bounds[c+1]], distinct) are touched
    in order, hits before misses are placed; each miss then takes a free slot (free[:n_free[0]], the last
    first) or else the slot of the lowest-ranked resident key the call does not need, and is stamped (LFU,
    `counted`) or queued as the newest (LRU: its recency queue `ends` / `links` stands for the stamps).
    Counts go to hits[c] / misses[c]. Returns the index of the first call it cannot take (wider than the
    group: the book streams what finds no slot), or len(calls)."""
    keys, bounds, _, calls, slot_of, key_of_slot, first_slot, free, n_free, mark, hits, misses = r
    width_max = 0
    for c in calls:
        width_max = max(width_max, bounds[c + 1] - bounds[c])
    missed = np.empty(width_max, dtype=np.int64)
    capacity = len(key_of_slot)
    on_hit = STAMP | (COUNT if counted else 0)
    on_miss = COUNT if counted and observes_misses else 0
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
                if counted:
                    touch(state, 0, key, on_hit)
                else:
                    renew(ends, links, key)
            else:
                missed[m] = key
                m += 1
                if on_miss:
                    touch(state, 0, key, on_miss)
        for j in range(m):
            key = missed[j]
            if n_free[0]:
                n_free[0] -= 1
                slot = free[n_free[0]]
            else:
                if counted:
                    victim = lowest(state, 0, True, key_of_slot, mark, tag)
                else:
                    victim = oldest(ends, links, mark, tag)
                    forget(ends, links, victim)
                slot = slot_of[victim]
                slot_of[victim] = -1
            slot_of[key] = slot
            key_of_slot[slot - first_slot] = key
            if counted:
                touch(state, 0, key, STAMP)
            else:
                renew(ends, links, key)
        hits[c] = b - a - m
        misses[c] = m
    return len(calls)


class RankedPolicy(CachePolicy):
    """Evict the candidate of lowest (count, stamp) (`counted`, LFU) or the least recently touched (LRU, by its
    recency queue); see the module docstring."""

    counted: ClassVar[bool] = False
    """Rank by lifetime access count first (LFU); False: by recency alone (LRU)."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, seed)
        self.index: dict[ExpertKey, int] = {}
        """Key -> position in the state, in first-seen order (or the order `bind` gave)."""
        self.keys: list[ExpertKey] = []
        """Position -> key."""
        self.state = np.zeros(1 + 2 * 64, dtype=np.int64)
        """[clock, stamp_0, count_0, ...]: the compiled functions' view of LFU."""
        self.ends = np.array([NONE, NONE, 0], dtype=np.int64)
        self.links = np.full((64, 3), NONE, dtype=np.int64)
        """LRU's recency queue of the resident keys (`queues`): its ends and size, each position's links."""
        self._marks = np.ones(64, dtype=np.int64)
        self._on_hit = STAMP | (COUNT if self.counted else 0)
        self._on_miss = COUNT if self.counted and self.observes_misses else 0

    @property
    def slots(self) -> int:
        """Keys the state has room for."""
        return len(self._marks)

    def bind(self, keys: list[ExpertKey]) -> np.ndarray:
        """Positions of `keys` (new ones appended, the state grown), for the compiled replay."""
        index = self.index
        for key in keys:
            if key not in index:
                index[key] = len(index)
                self.keys.append(key)
        if len(index) > self.slots:
            size = max(len(index), 2 * self.slots)
            self.state = np.concatenate([self.state, np.zeros(2 * (size - self.slots), np.int64)])
            self.links = np.concatenate([self.links, np.full((size - self.slots, 3), NONE, np.int64)])
            self._marks = np.ones(size, dtype=np.int64)
        return np.array([index[key] for key in keys], dtype=np.int64)

    def _at(self, key: ExpertKey) -> int:
        i = self.index.get(key)
        return int(self.bind([key])[0]) if i is None else i

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        if not self.counted:  # LRU: a hit renews (a miss is placed by on_insert)
            if hit:
                renew(self.ends, self.links, self._at(key))
            return
        how = self._on_hit if hit else self._on_miss
        if how:
            at = self._at(key)  # first: a new key may grow (replace) the state array
            touch(self.state, 0, at, how)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        at = self._at(key)  # first: a new key may grow (replace) the state arrays
        if self.counted:
            touch(self.state, 0, at, STAMP)
        else:
            renew(self.ends, self.links, at)

    def on_evict(self, key: ExpertKey, now: int) -> None:
        if not self.counted:
            forget(self.ends, self.links, self._at(key))

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        try:  # candidates are resident, so known; bind would also take new keys, at a Python loop's cost
            at = np.fromiter(map(self.index.__getitem__, candidates), np.int64, len(candidates))
        except KeyError:
            at = self.bind(list(candidates))
        if self.counted:  # a scan of the candidates themselves: none is skipped (tag 0)
            chosen = lowest(self.state, 0, True, at, self._marks, 0)
        else:
            with only(self._marks, at) as marks:
                chosen = oldest(self.ends, self.links, marks, 1)
        if chosen < 0:
            raise AssertionError("victim() called without a resident candidate")
        return self.keys[chosen]

    def replay(self, r: GroupReplay, start: int) -> int:
        """`replay_group` with this policy's state (the book's call, as `CompiledPolicy.replay`; the ranking
        ignores the clock `r.nows`)."""
        return replay_group(self.state, self.ends, self.links, self.counted, self.observes_misses, r, start)
