"""LFU: evict the resident expert with the fewest accesses, ties broken by least recent use.

Two counter scopes, named in every result: `lfu` counts over the whole lifetime (counts survive
eviction, never reset); `lfu-window:W` counts only the accesses of the last W token steps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Set

from harness.cache.base import CachePolicy
from harness.cache.ranked import RankedPolicy
from harness.cache.registry import register_policy
from harness.errors import HarnessError
from harness.keys import ExpertKey

DEFAULT_WINDOW_STEPS = 128
"""Window of `lfu-window` without an argument, in token steps (a documented default, not a paper's)."""


@register_policy
class LFU(RankedPolicy):
    """Lifetime counts (a miss counts too; a key placed without an access counts 0); ties go to the least
    recently used key, in LRU's order (within one step, the hits, by expert id, were touched before the
    misses were inserted, by expert id). Compiled replay (`ranked`)."""

    name = "lfu"
    counted = True

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
