"""S3-FIFO (Yang et al., SOSP 2023): a small FIFO, a main FIFO and a ghost FIFO of evicted keys.

- Sizes: the small queue's target is 10% of the capacity (at least one slot); the ghost remembers as many
  keys as the main queue's share (capacity - small target).
- A hit increments the key's counter, capped at 3. A new key enters the small queue at its head, or the
  main queue when it is in the ghost (and leaves the ghost).
- Eviction: when the small queue holds at least its target (or main is empty), from the small queue's
  tail: a key that was hit since it entered (counter >= 1, POLICIES.md) moves to main's head with its
  counter reset, and the next is examined; an unhit key is the victim and goes to the ghost. Otherwise from
  main's tail: a key with counter > 0 is reinserted at the head with the counter decremented; a key at 0 is
  the victim (main's victims leave no ghost).
Harness reading: keys the current step needs are not candidates; the scans pass over them unchanged.
"""

from __future__ import annotations

from collections.abc import Set

from harness.cache.base import CachePolicy
from harness.cache.registry import register_policy
from harness.keys import ExpertKey

SMALL_SHARE = 0.1
"""The small queue's share of the capacity (the paper's 10%)."""
MAX_COUNT = 3
"""Cap of the per-key access counter (the paper's two bits)."""


@register_policy
class S3FIFO(CachePolicy):
    name = "s3fifo"
    observes_misses = False

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, seed)
        self.small_target = max(1, round(SMALL_SHARE * capacity))
        self.ghost_size = max(1, capacity - self.small_target)
        # Dicts keep insertion order: the first key is the tail (oldest), the last the head.
        self._small: dict[ExpertKey, None] = {}
        self._main: dict[ExpertKey, None] = {}
        self._ghost: dict[ExpertKey, None] = {}
        self._count: dict[ExpertKey, int] = {}

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        if hit:
            self._count[key] = min(MAX_COUNT, self._count[key] + 1)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self._count[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None

    def on_evict(self, key: ExpertKey, now: int) -> None:
        del self._count[key]
        if key in self._small:
            del self._small[key]
            self._ghost[key] = None
            if len(self._ghost) > self.ghost_size:
                del self._ghost[next(iter(self._ghost))]
        else:
            del self._main[key]

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        small, main, count = self._small, self._main, self._count
        if len(small) >= self.small_target or not main:
            for key in list(small):
                if key not in candidates:
                    continue
                if count[key] == 0:
                    return key
                del small[key]
                main[key] = None
                count[key] = 0
        # Each pass over main decrements every candidate's counter: at most MAX_COUNT + 1 passes.
        if any(key in candidates for key in main):
            while True:
                for key in list(main):
                    if key not in candidates:
                        continue
                    if count[key] == 0:
                        return key
                    del main[key]
                    main[key] = None
                    count[key] -= 1
        for key in small:  # only reached when main holds no candidate at all
            if key in candidates:
                return key
        raise AssertionError("victim() called without a resident candidate")

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "small_slots": self.small_target, "ghost_keys": self.ghost_size}
