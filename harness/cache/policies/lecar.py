"""LeCaR (Vietri et al., HotStorage 2018): regret-weighted choice between LRU and LFU, composed of both.

Each eviction draws LRU with probability w_lru (else LFU, lifetime counts) from a seeded generator;
the victim goes into that expert's history (at most `capacity` keys each). A miss on a key in LRU's
history means LRU chose badly: LFU's weight grows by exp(learning_rate * discount^age), where age is
the number of accesses since that eviction; symmetrically for LFU's history. Weights are then
normalised. Learning rate 0.45 and discount 0.005^(1/capacity) are the paper's defaults.
"""

from __future__ import annotations

import math
import random
from collections.abc import Set

from harness.cache.base import CachePolicy
from harness.cache.policies.lfu import LFU
from harness.cache.policies.lru import LRU
from harness.cache.registry import register_policy
from harness.keys import ExpertKey

LEARNING_RATE = 0.45
DISCOUNT_BASE = 0.005


@register_policy
class LeCaR(CachePolicy):
    name = "lecar"

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, seed)
        self._lru = LRU(capacity, seed)
        self._lfu = LFU(capacity, seed)
        self._rng = random.Random(seed)
        self.w_lru = 0.5
        self.discount = DISCOUNT_BASE ** (1.0 / capacity)
        self._clock = 0  # accesses seen, the age unit of the histories
        self._hist_lru: dict[ExpertKey, int] = {}  # key -> clock at eviction, oldest first
        self._hist_lfu: dict[ExpertKey, int] = {}
        self._chosen: dict[ExpertKey, bool] = {}  # victim -> chosen by LRU, until on_evict files it

    def on_step(self, layer: int, now: int) -> None:
        self._lfu.on_step(layer, now)

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        self._clock += 1
        self._lru.on_access(key, now, hit)
        self._lfu.on_access(key, now, hit)
        if hit:
            return
        w_lru, w_lfu = self.w_lru, 1.0 - self.w_lru
        if key in self._hist_lru:
            w_lfu *= math.exp(LEARNING_RATE * self.discount ** (self._clock - self._hist_lru.pop(key)))
        elif key in self._hist_lfu:
            w_lru *= math.exp(LEARNING_RATE * self.discount ** (self._clock - self._hist_lfu.pop(key)))
        else:
            return
        self.w_lru = w_lru / (w_lru + w_lfu)

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        by_lru = self._rng.random() < self.w_lru
        key = (self._lru if by_lru else self._lfu).victim(candidates, incoming, now)
        self._chosen[key] = by_lru
        return key

    def on_evict(self, key: ExpertKey, now: int) -> None:
        self._lru.on_evict(key, now)
        self._lfu.on_evict(key, now)
        by_lru = self._chosen.pop(key, None)
        if by_lru is None:
            return  # dropped by the engine, not chosen by either expert: no regret to learn from
        history = self._hist_lru if by_lru else self._hist_lfu
        history[key] = self._clock
        if len(history) > self.capacity:
            del history[next(iter(history))]

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self._lru.on_insert(key, now)
        self._lfu.on_insert(key, now)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "lfu_counts": "lifetime",
            "learning_rate": LEARNING_RATE,
            "discount": self.discount,
            "w_lru": self.w_lru,
        }
