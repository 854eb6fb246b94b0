"""LFU: evict the resident expert with the fewest accesses, ties broken by least recent use.

Two counter scopes, named in every result: `lfu` counts over the whole lifetime (counts survive
eviction, never reset); `lfu-window:W` counts only the accesses of the last W token steps.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Container, Sequence, Set

from harness.cache.base import CachePolicy, ExpertKey
from harness.cache.registry import register_policy
from harness.errors import HarnessError

DEFAULT_WINDOW_STEPS = 128
"""Window of `lfu-window` without an argument, in token steps (a documented default, not a paper's)."""


@register_policy
class LFU(CachePolicy):
    """Lifetime counts; ties go to the least recently used key, in LRU's order (within one step, the hits,
    by expert id, were touched before the misses were inserted, by expert id).

    Resident keys are ranked by (count, rank), where the rank grows each time a key takes its place in
    the order; the ranking is a heap of (count, rank, key) entries, so a victim is the heap's top, found
    without a scan. A key's entry goes stale (is dropped when it reaches the top) once the key is touched
    or evicted: `_rank` holds the rank of each key's live entry. The keys of the step being handled are
    held back in `_pending` (they can never be victims of their own step) and take their places, in the
    order they were touched, when the next step starts (`on_step`), or earlier where `victim` is called
    from outside the loop's fused `replace` (an engine's prefetch between steps, LeCaR).
    """

    name = "lfu"

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, seed)
        self._count: dict[ExpertKey, int] = {}
        self._heap: list[tuple[int, int, ExpertKey]] = []
        self._rank: dict[ExpertKey, int] = {}  # resident, placed keys -> rank of their live heap entry
        self._next_rank = 0
        self._pending: list[ExpertKey] = []  # touched by the current step, in touch order

    def _flush(self) -> None:
        count, rank, heap = self._count, self._rank, self._heap
        r = self._next_rank
        for key in self._pending:
            rank[key] = r
            # count 0: inserted without an access (an engine's static placement)
            heapq.heappush(heap, (count.get(key, 0), r, key))
            r += 1
        self._next_rank = r
        self._pending.clear()
        if len(heap) > 2 * len(rank) + 32:  # drop stale entries
            self._heap = [entry for entry in heap if rank.get(entry[2]) == entry[1]]
            heapq.heapify(self._heap)

    def on_step(self, layer: int, now: int) -> None:
        self._flush()

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        count = self._count
        count[key] = count.get(key, 0) + 1
        if hit:
            del self._rank[key]
            self._pending.append(key)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self._pending.append(key)

    def _pop_victim(self) -> ExpertKey:
        """Take the lowest-ranked placed key out of the ranking."""
        heap, rank = self._heap, self._rank
        while True:
            _, r, key = heapq.heappop(heap)
            if rank.get(key) == r:
                del rank[key]
                return key

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        # Outside the loop's fused path the last step's keys may be candidates: place them first.
        # Placing keys early never changes the order, only the scan length.
        self._flush()
        rank = self._rank
        for _, r, key in sorted(self._heap):
            if rank.get(key) == r and key in candidates:
                return key
        raise AssertionError("victim() called without a resident candidate")

    def on_evict(self, key: ExpertKey, now: int) -> None:
        if self._rank.pop(key, None) is None:
            self._pending.remove(key)  # dropped by its own step's caller (e.g. an engine discarding it)

    def replace(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        # victim + on_evict + on_insert fused (the loop's path for each miss). The step's keys are all
        # pending or not resident, so the top of the ranking is a candidate unless `victim` placed them
        # early (LeCaR, prefetch); then the scan decides.
        heap, rank = self._heap, self._rank
        while rank.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)
        key = heap[0][2]
        if key not in candidates:
            key = self.victim(candidates, incoming, now)
        del rank[key]
        self._pending.append(incoming)
        return key

    # Batch forms for trace replay: the same counter and ranking moves as the per-key hooks, without a
    # call per key.

    def access_step(self, keys: Sequence[ExpertKey], resident: Container[ExpertKey], now: int) -> list[ExpertKey]:
        count, rank, pending = self._count, self._rank, self._pending
        misses = []
        for key in keys:
            count[key] = count.get(key, 0) + 1
            if key in resident:
                del rank[key]
                pending.append(key)
            else:
                misses.append(key)
        return misses

    def replace_step(
        self, resident: Set[ExpertKey], needed: Sequence[ExpertKey], incoming: Sequence[ExpertKey], now: int
    ) -> list[ExpertKey]:
        # `access_step` has just taken the step's resident keys out of the ranking into `_pending`, and the
        # misses are not in it, so every ranked key is a candidate: the victims are the lowest-ranked keys,
        # in order, as the per-key loop would take them one by one.
        heap, rank, pop = self._heap, self._rank, heapq.heappop
        victims = []
        for _ in incoming:
            while True:  # _pop_victim, inlined
                _, r, key = pop(heap)
                if rank.get(key) == r:
                    del rank[key]
                    victims.append(key)
                    break
        self._pending.extend(incoming)
        return victims

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "counts": "lifetime", "window_steps": None, "ties": "least recently used"}


@register_policy
class WindowedLFU(CachePolicy):
    """Counts of the last `window` token steps; an access leaves the count `window` steps after it."""

    name = "lfu-window"

    def __init__(self, capacity: int, seed: int = 0, window: int = DEFAULT_WINDOW_STEPS) -> None:
        super().__init__(capacity, seed)
        self.window = window
        self._count: dict[ExpertKey, int] = {}
        self._last: dict[ExpertKey, int] = {}
        self._recent: deque[tuple[int, ExpertKey]] = deque()  # (step, key) of the accesses in the window

    @classmethod
    def from_spec(cls, capacity: int, seed: int, argument: str | None, **_: object) -> WindowedLFU:
        try:
            window = DEFAULT_WINDOW_STEPS if argument is None else int(argument)
        except ValueError:
            raise HarnessError(
                f"lfu-window takes a window in token steps, e.g. lfu-window:128 (got {argument!r})"
            ) from None
        if window < 1:
            raise HarnessError(f"lfu-window needs a window of at least 1 step (got {window})")
        return cls(capacity, seed, window)

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        self._last[key] = now
        self._recent.append((now, key))
        horizon = now - self.window
        while self._recent[0][0] <= horizon:
            _, old = self._recent.popleft()
            self._count[old] -= 1

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        count, last = self._count, self._last
        # A key placed without an access (an engine's static placement) counts 0, last used never.
        return min(candidates, key=lambda k: (count.get(k, 0), last.get(k, -1), k))

    def reset(self) -> None:
        self.__init__(self.capacity, self.seed, self.window)  # type: ignore[misc]

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "counts": "window", "window_steps": self.window}
