"""LFU: evict the resident expert with the fewest accesses, ties broken by least recent use.

Two counter scopes, named in every result: `lfu` counts over the whole lifetime (counts survive
eviction, never reset); `lfu-window:W` counts only the accesses of the last W token steps.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Set

from harness.cache.base import CachePolicy, ExpertKey
from harness.cache.registry import register_policy
from harness.errors import HarnessError

DEFAULT_WINDOW_STEPS = 128
"""Window of `lfu-window` without an argument, in token steps (a documented default, not a paper's)."""


@register_policy
class LFU(CachePolicy):
    """Lifetime counts; ties go to the least recently used key, in LRU's order (within one step, the hits,
    by expert id, were touched before the misses were inserted, by expert id).

    Resident keys sit in one bucket per count, each bucket in LRU order, so a victim is the first key of
    the lowest bucket, found without a scan. The keys of the step being handled are held back in
    `_pending` (they can never be victims of their own step) and join their buckets, in the order they
    were touched, when the next step starts (`on_step`), or earlier where `victim` is called from outside
    the loop's fused `replace` (an engine's prefetch between steps): the hot path then scans candidates only.
    """

    name = "lfu"

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, seed)
        self._count: dict[ExpertKey, int] = {}
        self._buckets: dict[int, dict[ExpertKey, None]] = {}
        # Counts of the buckets, as a heap with stale entries (buckets since emptied) popped lazily.
        self._heap: list[int] = []
        self._pending: list[ExpertKey] = []  # touched by the current step, in touch order

    def _flush(self) -> None:
        buckets, count = self._buckets, self._count
        for key in self._pending:
            c = count.get(key, 0)  # 0: inserted without an access (an engine's static placement)
            bucket = buckets.get(c)
            if bucket is None:
                buckets[c] = {key: None}
                heapq.heappush(self._heap, c)
            else:
                bucket[key] = None
        self._pending.clear()
        if len(self._heap) > 2 * len(buckets) + 32:
            self._heap = sorted(buckets)  # drop stale entries; a sorted list is a heap

    def on_step(self, layer: int, now: int) -> None:
        self._flush()

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        count = self._count
        c = count.get(key, 0)
        count[key] = c + 1
        if hit:
            bucket = self._buckets[c]
            del bucket[key]
            if not bucket:
                del self._buckets[c]
            self._pending.append(key)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self._pending.append(key)

    def _lowest(self) -> int:
        """Count of the lowest non-empty bucket."""
        heap, buckets = self._heap, self._buckets
        while heap[0] not in buckets:
            heapq.heappop(heap)
        return heap[0]

    def _victim(self, candidates: Set[ExpertKey]) -> tuple[ExpertKey, dict[ExpertKey, None], int]:
        buckets = self._buckets
        c = self._lowest()
        for key in buckets[c]:
            if key in candidates:
                return key, buckets[c], c
        # The lowest bucket holds only keys the step needs (placed early by `victim`): look further up.
        for c in sorted(buckets):
            for key in buckets[c]:
                if key in candidates:
                    return key, buckets[c], c
        raise AssertionError("victim() called without a resident candidate")

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        # Outside the loop's fused path (a prefetch between steps, LeCaR) the last step's keys may be
        # candidates: place them first. Placing keys early never changes the order, only the scan length.
        self._flush()
        return self._victim(candidates)[0]

    def on_evict(self, key: ExpertKey, now: int) -> None:
        c = self._count.get(key, 0)
        bucket = self._buckets.get(c)
        if bucket is not None and key in bucket:
            del bucket[key]
            if not bucket:
                del self._buckets[c]
        else:
            self._pending.remove(key)  # dropped by its own step's caller (e.g. an engine discarding it)

    def replace(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        # victim + on_evict + on_insert fused (the replay hot path), same bucket moves; the first key of
        # the lowest bucket is inlined, as it is the victim nearly every time.
        buckets, heap = self._buckets, self._heap
        while heap[0] not in buckets:
            heapq.heappop(heap)
        c = heap[0]
        bucket = buckets[c]
        key = next(iter(bucket))
        if key not in candidates:
            key, bucket, c = self._victim(candidates)
        del bucket[key]
        if not bucket:
            del buckets[c]
        self._pending.append(incoming)
        return key

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
