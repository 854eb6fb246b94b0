"""Frequency-weighted LRU (Flash-MoE's CUDA port): evict the resident expert with the smallest
`w x access_count + last_used`, `last_used` being the token step of its last access.

Spec `fwlru` (w = 10, the port's value) or `fwlru:W`. Reading of `access_count` (the port's cache-entry
field; its reset rule was not read here): accesses since the expert was last loaded, the load counting as
one, so an evicted expert starts again from one. Ties go to the smaller (last_used, key).
"""

from __future__ import annotations

from collections.abc import Set

from harness.cache.base import CachePolicy
from harness.cache.registry import register_policy
from harness.errors import HarnessError
from harness.keys import ExpertKey

DEFAULT_WEIGHT = 10.0
"""Steps of recency one access is worth (Flash-MoE's CUDA port: `access_count * 10 + last_used`)."""


@register_policy
class FrequencyWeightedLRU(CachePolicy):
    name = "fwlru"

    def __init__(self, capacity: int, seed: int = 0, weight: float = DEFAULT_WEIGHT) -> None:
        super().__init__(capacity, seed)
        self.weight = weight
        self._count: dict[ExpertKey, int] = {}  # resident keys: accesses since the load
        self._last: dict[ExpertKey, int] = {}

    @classmethod
    def from_spec(cls, capacity: int, seed: int, argument: str | None, **_: object) -> FrequencyWeightedLRU:
        try:
            weight = DEFAULT_WEIGHT if argument is None else float(argument)
        except ValueError:
            raise HarnessError(f"fwlru takes a weight in steps per access, e.g. fwlru:10 (got {argument!r})") from None
        if not weight >= 0:
            raise HarnessError(f"fwlru needs a weight >= 0 (got {argument!r})")
        return cls(capacity, seed, weight)

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        if hit:
            self._count[key] += 1
        self._last[key] = now

    def on_insert(self, key: ExpertKey, now: int) -> None:
        # A miss was seen by on_access (last_used = now); a placed key (engine) was never used: now.
        self._count[key] = 1
        self._last.setdefault(key, now)

    def on_evict(self, key: ExpertKey, now: int) -> None:
        del self._count[key]
        del self._last[key]

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        count, last, w = self._count, self._last, self.weight
        return min(candidates, key=lambda k: (w * count[k] + last[k], last[k], k))

    def reset(self) -> None:
        self.__init__(self.capacity, self.seed, self.weight)  # type: ignore[misc]

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "weight_steps": self.weight, "count": "accesses since the load"}
