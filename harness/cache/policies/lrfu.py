"""LRFU (Lee et al., IEEE ToC 2001): evict the resident expert with the smallest combined recency and
frequency, `CRF(now) = sum over its past accesses t_i of (1/2)^(lambda x (now - t_i))`.

Spec `lrfu` (lambda = 0.01 per token step, a documented default: an access loses half its weight in 100
steps) or `lrfu:LAMBDA`. lambda = 0 is LFU with lifetime counts; a large lambda tends to LRU.

Incremental form: a key keeps only `s = log2(CRF(t_last)) + lambda x t_last`, updated at each access as
`s = log2(1 + 2^(s_old - lambda x now)) + lambda x now`. Since `log2 CRF(now) = s - lambda x now` for every
key, ranking by `s` is ranking by CRF at any time, without decaying every key each step and without the
underflow of `2^(-lambda x age)`. CRF values are lifetime (kept after eviction), as `lfu`'s counts. Ties
go to the least recent last access, then the smaller key.
"""

from __future__ import annotations

import math
from collections.abc import Set

from harness.cache.base import CachePolicy
from harness.cache.registry import register_policy
from harness.errors import HarnessError
from harness.keys import ExpertKey

DEFAULT_LAMBDA = 0.01
"""Decay per token step (half-life 1/lambda = 100 steps); a documented default, not the paper's."""


@register_policy
class LRFU(CachePolicy):
    name = "lrfu"

    def __init__(self, capacity: int, seed: int = 0, decay: float = DEFAULT_LAMBDA) -> None:
        super().__init__(capacity, seed)
        self.decay = decay
        self._score: dict[ExpertKey, float] = {}  # log2(CRF at last access) + lambda x last access
        self._last: dict[ExpertKey, int] = {}

    @classmethod
    def from_spec(cls, capacity: int, seed: int, argument: str | None, **_: object) -> LRFU:
        try:
            decay = DEFAULT_LAMBDA if argument is None else float(argument)
        except ValueError:
            raise HarnessError(f"lrfu takes lambda, a decay per step, e.g. lrfu:0.01 (got {argument!r})") from None
        if not 0 <= decay < math.inf:
            raise HarnessError(f"lrfu needs a finite lambda >= 0 (got {argument!r})")
        return cls(capacity, seed, decay)

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        base = self.decay * now
        old = self._score.get(key)
        crf = 1.0 if old is None else 1.0 + 2.0 ** (old - base)
        self._score[key] = math.log2(crf) + base
        self._last[key] = now

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        score, last = self._score, self._last
        # A key placed without an access (an engine's placement) has CRF 0: it goes first.
        return min(candidates, key=lambda k: (score.get(k, -math.inf), last.get(k, -1), k))

    def reset(self) -> None:
        self.__init__(self.capacity, self.seed, self.decay)  # type: ignore[misc]

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "lambda_per_step": self.decay, "crf": "lifetime"}
