"""LRU and LFU with a compiled step: the victim is the least recently touched candidate (LRU), or of the
candidates with the fewest lifetime accesses (LFU, ties to the least recently touched).

Both keep their resident keys in buckets, one per access count (LRU: one bucket), each a recency queue
(`harness.cache.queues`), the buckets linked in count order: a touch (a hit, an insert) moves a key to the
newest end of its count's bucket, and the victim is the oldest key the step does not need in the lowest bucket
(`renew`, `forget`, `oldest`): a step or two per decision, where scanning every resident key's count and
stamp took one step a slot (a global cache of 256 slots replayed 3.5 million accesses a second with LRU, 2.8
with LFU). These jitted functions are called by the policy's per-key hooks (the live engine, and any step the
compiled loop does not take) and by `replay_group`, the compiled replay of a whole stream of one cache group's
steps, which the simulator uses: one implementation of each policy, whichever path runs it. `touch` and `lowest`
(a clock stamp and a count per key, and a scan for the lowest) serve LeCaR's two experts.

The functions are compiled with numba (`harness.cache.jit`) for their one signature when this module is
imported (cached on disk after the first time), so that no compilation pause falls inside a measured run.

Any other policy keeps working through the Python hooks: the compiled replay is opt-in, taken only
where every group's policy is a `RankedPolicy`.
"""

from __future__ import annotations

from collections.abc import Set
from typing import ClassVar, NamedTuple

import numpy as np

from harness.cache.base import CachePolicy
from harness.cache.jit import KERNEL, njit
from harness.cache.queues import NONE, OLDEST, SIZE, push, unlink
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


RENEW_SIG = types.none(types.int64[:], types.int64[:, :], types.int64[:], types.int64, types.int64) if types else None
FORGET_SIG = types.none(types.int64[:], types.int64[:, :], types.int64[:], types.int64) if types else None
OLDEST_SIG = (
    types.int64(types.int64[:], types.int64[:, :], types.int64[:], types.int64[:], types.int64) if types else None
)
NEWER = 2
"""A key's row in `links`: its bucket (NONE: not resident), its older and its newer neighbour (`queues`)."""
LOWEST, FREE = 0, 1
"""`order`'s header: the bucket of the lowest count (NONE: none), the first free bucket; then per bucket b, at
order[2 + 3 b:], its count and the buckets of the next lower and the next higher count (or, free, the next free)."""
BUCKET_COUNT, LOWER, HIGHER = 0, 1, 2


@njit(**KERNEL, inline="always")
def _open(order: np.ndarray, count: int, lower: int, higher: int) -> int:
    """A free bucket for `count`, linked between buckets `lower` and `higher` (NONE: an end)."""
    b = order[FREE]
    at = 2 + 3 * b
    order[FREE] = order[at + HIGHER]
    order[at + BUCKET_COUNT], order[at + LOWER], order[at + HIGHER] = count, lower, higher
    if lower == NONE:
        order[LOWEST] = b
    else:
        order[2 + 3 * lower + HIGHER] = b
    if higher != NONE:
        order[2 + 3 * higher + LOWER] = b
    return b


@njit(**KERNEL, inline="always")
def _close(order: np.ndarray, b: int) -> None:
    """Bucket `b` (emptied) leaves the order and joins the free ones."""
    at = 2 + 3 * b
    lower, higher = order[at + LOWER], order[at + HIGHER]
    if lower == NONE:
        order[LOWEST] = higher
    else:
        order[2 + 3 * lower + HIGHER] = higher
    if higher != NONE:
        order[2 + 3 * higher + LOWER] = lower
    order[at + HIGHER] = order[FREE]
    order[FREE] = b


@njit(RENEW_SIG, **KERNEL)
def renew(ends: np.ndarray, links: np.ndarray, order: np.ndarray, key: int, count: int) -> None:
    """`key` was touched (a hit or an insert) and has `count` accesses (LRU: always 0): it moves to the newest end
    of the bucket of that count, a recency queue (`queues`), the bucket opened where none has that count. A
    resident key's count only grows, so its new bucket is at or above its old one."""
    lower, higher = NONE, order[LOWEST]  # where to look for the count: between these two buckets
    old = links[key, 0]
    if old != NONE:
        unlink(ends, links, key, 0)
        if order[2 + 3 * old + BUCKET_COUNT] == count:
            push(ends, links, old, key, 0)
            return
        lower, higher = old, order[2 + 3 * old + HIGHER]
    while higher != NONE and order[2 + 3 * higher + BUCKET_COUNT] < count:
        lower, higher = higher, order[2 + 3 * higher + HIGHER]
    if higher != NONE and order[2 + 3 * higher + BUCKET_COUNT] == count:
        target = higher
    else:
        target = _open(order, count, lower, higher)
    push(ends, links, target, key, 0)
    if old != NONE and ends[3 * old + SIZE] == 0:
        _close(order, old)


@njit(FORGET_SIG, **KERNEL)
def forget(ends: np.ndarray, links: np.ndarray, order: np.ndarray, key: int) -> None:
    """`key` left the cache: out of its bucket (if in one), which closes if emptied."""
    b = links[key, 0]
    if b != NONE:
        unlink(ends, links, key, 0)
        if ends[3 * b + SIZE] == 0:
            _close(order, b)


@njit(OLDEST_SIG, **KERNEL)
def oldest(ends: np.ndarray, links: np.ndarray, order: np.ndarray, skip: np.ndarray, tag: int) -> int:
    """The victim: in the bucket of the lowest count, the least recently touched key whose `skip` mark is not
    `tag` (else in the next bucket up); -1 if none. The keys a step marks were just touched (or are not
    resident), so the walk rarely passes one."""
    b = order[LOWEST]
    while b != NONE:
        key = ends[3 * b + OLDEST]
        while key != NONE and skip[key] == tag:
            key = links[key, NEWER]
        if key != NONE:
            return key
        b = order[2 + 3 * b + HIGHER]
    return NONE


@njit(
    types.int64(
        types.int64[:],
        types.int64[:],
        types.int64[:, :],
        types.int64[:],
        types.boolean,
        types.boolean,
        GROUP_REPLAY,
        types.int64,
    )
    if types
    else None,
    cache=True,
)
def replay_group(
    counts: np.ndarray,
    ends: np.ndarray,
    links: np.ndarray,
    order: np.ndarray,
    counted: bool,
    observes_misses: bool,
    r: GroupReplay,
    start: int,
) -> int:
    """Replay r.calls[start:] of one cache group (`GroupReplay`) with nothing staged and every miss admitted, as
    `ExpertCacheBook.account` would: each call's keys (keys[bounds[c]:bounds[c+1]], distinct) are touched
    in order (`renew`), hits before misses are placed; each miss then takes a free slot (free[:n_free[0]], the
    last first) or else the slot of the lowest-ranked resident key the call does not need (`oldest`), and is
    touched. Counts go to hits[c] / misses[c]. Returns the index of the first call it cannot take (wider than the
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
                if counted:
                    counts[key] += 1
                renew(ends, links, order, key, counts[key] if counted else 0)
            else:
                missed[m] = key
                m += 1
                if counted and observes_misses:
                    counts[key] += 1
        for j in range(m):
            key = missed[j]
            if n_free[0]:
                n_free[0] -= 1
                slot = free[n_free[0]]
            else:
                victim = oldest(ends, links, order, mark, tag)
                forget(ends, links, order, victim)
                slot = slot_of[victim]
                slot_of[victim] = -1
            slot_of[key] = slot
            key_of_slot[slot - first_slot] = key
            renew(ends, links, order, key, counts[key] if counted else 0)
        hits[c] = b - a - m
        misses[c] = m
    return len(calls)


class RankedPolicy(CachePolicy):
    """Evict the least recently touched candidate (LRU), or of those with the fewest lifetime accesses (LFU,
    `counted`): one bucket of keys per access count, each a recency queue; LRU has one bucket."""

    counted: ClassVar[bool] = False
    """Rank by lifetime access count first (LFU); False: by recency alone (LRU)."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, seed)
        self.index: dict[ExpertKey, int] = {}
        """Key -> position in the arrays, in first-seen order (or the order `bind` gave)."""
        self.keys: list[ExpertKey] = []
        """Position -> key."""
        self.counts = np.zeros(0, dtype=np.int64)
        """LFU: each position's lifetime accesses (a miss counts where the policy observes misses)."""
        self.links = np.zeros((0, 3), dtype=np.int64)
        """Each position's bucket (NONE: not resident) and neighbours in it (`queues`)."""
        self.ends = np.zeros(0, dtype=np.int64)
        """Each bucket's queue ends and size (`queues`)."""
        self.order = np.array([NONE, NONE], dtype=np.int64)
        """The buckets by count (`LOWEST`, `FREE`, then per bucket its count and neighbours)."""
        self._marks = np.zeros(0, dtype=np.int64)
        self._grow(64)

    @property
    def slots(self) -> int:
        """Keys the arrays have room for."""
        return len(self._marks)

    def _grow(self, size: int) -> None:
        """Room for `size` keys, and as many buckets (resident keys have at most that many counts): the new
        buckets join the free ones."""
        more = size - self.slots
        first = self.slots
        self.counts = np.concatenate([self.counts, np.zeros(more, np.int64)])
        self.links = np.concatenate([self.links, np.full((more, 3), NONE, np.int64)])
        self.ends = np.concatenate([self.ends, np.tile(np.array([NONE, NONE, 0], np.int64), more)])
        fresh = np.zeros((more, 3), np.int64)
        fresh[:, HIGHER] = np.arange(first + 1, size + 1)
        fresh[-1, HIGHER] = self.order[FREE]
        self.order = np.concatenate([self.order, fresh.ravel()])
        self.order[FREE] = first
        self._marks = np.ones(size, dtype=np.int64)

    def bind(self, keys: list[ExpertKey]) -> np.ndarray:
        """Positions of `keys` (new ones appended, the arrays grown), for the compiled replay."""
        index = self.index
        for key in keys:
            if key not in index:
                index[key] = len(index)
                self.keys.append(key)
        if len(index) > self.slots:
            self._grow(max(len(index), 2 * self.slots))
        return np.array([index[key] for key in keys], dtype=np.int64)

    def _at(self, key: ExpertKey) -> int:
        i = self.index.get(key)
        return int(self.bind([key])[0]) if i is None else i

    def _renew(self, at: int) -> None:
        renew(self.ends, self.links, self.order, at, int(self.counts[at]) if self.counted else 0)

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        if not hit and not (self.counted and self.observes_misses):
            return  # a miss is placed by on_insert (LRU ignores misses)
        at = self._at(key)  # first: a new key grows (replaces) the arrays
        if self.counted:
            self.counts[at] += 1
        if hit:
            self._renew(at)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self._renew(self._at(key))

    def on_evict(self, key: ExpertKey, now: int) -> None:
        forget(self.ends, self.links, self.order, self._at(key))

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        try:  # candidates are resident, so known; bind would also take new keys, at a Python loop's cost
            at = np.fromiter(map(self.index.__getitem__, candidates), np.int64, len(candidates))
        except KeyError:
            at = self.bind(list(candidates))
        marks = self._marks  # every key marked but the candidates (tag 1)
        marks[at] = 0
        try:
            chosen = oldest(self.ends, self.links, self.order, marks, 1)
        finally:
            marks[at] = 1
        if chosen < 0:
            raise AssertionError("victim() called without a resident candidate")
        return self.keys[chosen]

    def replay(self, r: GroupReplay, start: int) -> int:
        """`replay_group` with this policy's arrays (the book's call, as `CompiledPolicy.replay`; the ranking
        ignores the clock `r.nows`)."""
        return replay_group(
            self.counts, self.ends, self.links, self.order, self.counted, self.observes_misses, r, start
        )
