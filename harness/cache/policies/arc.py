"""ARC (Megiddo & Modha, FAST 2003) over expert keys: adaptive split between recency and frequency.

Lists, each from least to most recent: T1 (resident, seen once since it entered), T2 (resident, seen
again), B1 and B2 (ghosts: keys recently evicted from T1 and T2, no slot). The target size p of T1
grows on a B1 ghost hit and shrinks on a B2 ghost hit. The shared cache loop decides when to evict;
ARC's REPLACE rule picks the list, and the least recent key of that list that the step does not need.
"""

from __future__ import annotations

from collections.abc import Set

from harness.cache.base import CachePolicy
from harness.cache.registry import register_policy
from harness.keys import ExpertKey


@register_policy
class ARC(CachePolicy):
    name = "arc"

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, seed)
        self.p = 0.0  # target size of T1, in slots
        self._t1: dict[ExpertKey, None] = {}
        self._t2: dict[ExpertKey, None] = {}
        self._b1: dict[ExpertKey, None] = {}
        self._b2: dict[ExpertKey, None] = {}
        self._from_b2: set[ExpertKey] = set()  # misses of this step that were B2 ghosts
        self._to_t2: set[ExpertKey] = set()  # misses of this step that were ghosts: they enter T2

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        if hit:
            # Resident and seen again: most recent end of T2.
            if key in self._t1:
                del self._t1[key]
            else:
                del self._t2[key]
            self._t2[key] = None
            return
        c = self.capacity
        if key in self._b1:
            self.p = min(float(c), self.p + max(len(self._b2) / len(self._b1), 1.0))
            del self._b1[key]
            self._to_t2.add(key)
        elif key in self._b2:
            self.p = max(0.0, self.p - max(len(self._b1) / len(self._b2), 1.0))
            del self._b2[key]
            self._to_t2.add(key)
            self._from_b2.add(key)

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        n1 = len(self._t1)
        prefer_t1 = n1 > 0 and (n1 > self.p or (incoming in self._from_b2 and n1 == self.p))
        first, second = (self._t1, self._t2) if prefer_t1 else (self._t2, self._t1)
        for order in (first, second):
            for key in order:
                if key in candidates:
                    return key
        raise AssertionError("victim() called without a resident candidate")

    def on_evict(self, key: ExpertKey, now: int) -> None:
        if key in self._t1:
            del self._t1[key]
            self._b1[key] = None
        else:
            del self._t2[key]
            self._b2[key] = None

    def on_insert(self, key: ExpertKey, now: int) -> None:
        if key in self._to_t2:
            self._to_t2.discard(key)
            self._from_b2.discard(key)
            self._t2[key] = None
        else:
            self._t1[key] = None
        # Ghost directory bounds of ARC: |T1| + |B1| <= c and the four lists together <= 2c.
        c = self.capacity
        while self._b1 and len(self._t1) + len(self._b1) > c:
            del self._b1[next(iter(self._b1))]
        while self._b2 and len(self._t1) + len(self._t2) + len(self._b1) + len(self._b2) > 2 * c:
            del self._b2[next(iter(self._b2))]

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "p": self.p}
