"""Random eviction: a uniformly drawn candidate, from a generator seeded per policy (same seed, same victims)."""

from __future__ import annotations

import random
from collections.abc import Set

from harness.cache.base import CachePolicy
from harness.cache.registry import register_policy
from harness.keys import ExpertKey


@register_policy
class RandomEviction(CachePolicy):
    name = "random"

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, seed)
        self._rng = random.Random(seed)

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        """Random keeps no state about accesses."""

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        # Sorted so the draw depends on the seed and the candidates only, not on set iteration order.
        return self._rng.choice(sorted(candidates))

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "seed": self.seed}
