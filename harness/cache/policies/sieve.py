"""SIEVE (Zhang et al., NSDI 2024): one FIFO queue, a visited bit per key, a hand that sweeps from the
tail (oldest) towards the head (newest).

A hit sets the key's bit; a new key enters at the head unvisited. To evict, the hand, starting where it
stopped last (at the tail when it has none), clears visited bits and moves on until it finds an unvisited
key: that key leaves and the hand stays at the next newer key (past the head it wraps to the tail). Keys
never move within the queue. Harness reading: keys the current step needs are not candidates; the hand
passes over them like over visited keys (clearing their bit if set), so a step never evicts its own keys.
"""

from __future__ import annotations

from collections.abc import Set

from harness.cache.base import CachePolicy
from harness.cache.registry import register_policy
from harness.keys import ExpertKey


@register_policy
class Sieve(CachePolicy):
    name = "sieve"
    observes_misses = False

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, seed)
        # A doubly linked queue in two dicts: each key's newer and older neighbour (None at the ends).
        self._newer: dict[ExpertKey, ExpertKey | None] = {}
        self._older: dict[ExpertKey, ExpertKey | None] = {}
        self._head: ExpertKey | None = None  # newest
        self._tail: ExpertKey | None = None  # oldest
        self._hand: ExpertKey | None = None
        self._visited: dict[ExpertKey, bool] = {}

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        self._visited[key] = True

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self._visited[key] = False
        self._older[key] = self._head
        self._newer[key] = None
        if self._head is not None:
            self._newer[self._head] = key
        self._head = key
        if self._tail is None:
            self._tail = key

    def on_evict(self, key: ExpertKey, now: int) -> None:
        newer, older = self._newer.pop(key), self._older.pop(key)
        del self._visited[key]
        if newer is None:
            self._head = older
        else:
            self._older[newer] = older
        if older is None:
            self._tail = newer
        else:
            self._newer[older] = newer
        if self._hand == key:
            self._hand = newer  # the hand stays where the victim was: its newer neighbour (None: the tail)

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        visited, newer = self._visited, self._newer
        key = self._hand if self._hand is not None else self._tail
        # Each pass clears the bits of the candidates it passes, so the second pass finds one.
        for _ in range(2 * len(newer) + 1):
            if key is None:
                key = self._tail
            if key in candidates and not visited[key]:
                self._hand = key
                return key
            visited[key] = False
            key = newer[key]
        raise AssertionError("victim() called without a resident candidate")

    def describe(self) -> dict[str, object]:
        return {"name": self.name}
