"""LRU: evict the resident expert whose last access is oldest."""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from itertools import islice

from harness.cache.base import CachePolicy
from harness.cache.registry import register_policy
from harness.keys import ExpertKey


@register_policy
class LRU(CachePolicy):
    name = "lru"
    observes_misses = False  # a miss is placed by on_insert; on_access only moves hits

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, seed)
        # Resident keys from least to most recently used; dicts keep insertion order, and
        # pop-then-set moves a key to the most-recent end in O(1).
        self._order: dict[ExpertKey, None] = {}

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        if hit:
            del self._order[key]
            self._order[key] = None

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self._order[key] = None

    def on_evict(self, key: ExpertKey, now: int) -> None:
        del self._order[key]

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        # The keys a step needs were touched first, so they sit at the recent end: the scan
        # almost always stops at the first key.
        for key in self._order:
            if key in candidates:
                return key
        raise AssertionError("victim() called without a resident candidate")

    def replace(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        # victim + on_evict + on_insert fused (the replay hot path): same scan, same dict moves.
        order = self._order
        for key in order:
            if key in candidates:
                del order[key]
                order[incoming] = None
                return key
        raise AssertionError("replace() called without a resident candidate")

    def replay_step(
        self, layer: int, keys: Sequence[ExpertKey], resident: Mapping[ExpertKey, int], now: int
    ) -> tuple[list[ExpertKey], list[ExpertKey]]:
        # The per-key hooks' dict moves without a call per key. The hits move to the recent end and the
        # misses are not in `_order`, so the candidates are exactly the keys before them: the victims are
        # the first len(misses), oldest first, as the per-key loop would take them (an inserted key is never
        # one).
        order = self._order
        misses = []
        for key in keys:
            if key in resident:
                del order[key]
                order[key] = None
            else:
                misses.append(key)
        if not misses:
            return misses, []
        victims = list(islice(order, len(misses)))
        for key in victims:
            del order[key]
        for key in misses:
            order[key] = None
        return misses, victims
