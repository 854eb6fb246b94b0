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

import numpy as np

from harness.cache.compiled import ACCESS_SIG, FIRST_COLUMN, VICTIM_SIG, CompiledPolicy, Kernel, ranks_below
from harness.cache.jit import KERNEL, njit
from harness.cache.registry import register_policy
from harness.errors import HarnessError

DEFAULT_LAMBDA = 0.01
"""Decay per token step (half-life 1/lambda = 100 steps); a documented default, not the paper's."""

LAST = FIRST_COLUMN
"""Int key column: the last access (-1: none)."""
SCORE = 0
"""Float key column: log2(CRF at last access) + lambda x last access (-inf: never accessed, CRF 0)."""
DECAY = 0
"""Float global: lambda."""


@njit(ACCESS_SIG, **KERNEL)
def lrfu_access(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int, hit: bool) -> None:
    base = gf[DECAY] * now
    old = kf[key, SCORE]
    crf = 1.0 if old == -np.inf else 1.0 + 2.0 ** (old - base)
    kf[key, SCORE] = math.log2(crf) + base
    ki[key, LAST] = now


@njit(VICTIM_SIG, **KERNEL)
def lrfu_victim(
    g: np.ndarray,
    gf: np.ndarray,
    ki: np.ndarray,
    kf: np.ndarray,
    resident: np.ndarray,
    mark: np.ndarray,
    tag: int,
    incoming: int,
    now: int,
) -> int:
    """The smallest (CRF, last access, key); a key placed without an access (an engine's placement) has CRF 0:
    it goes first."""
    best = -1
    for key in resident:
        if key >= 0 and mark[key] != tag and (best < 0 or ranks_below(kf, ki, key, best, SCORE, LAST)):
            best = key
    return best


@register_policy
class LRFU(CompiledPolicy):
    name = "lrfu"
    kernel = Kernel(access=lrfu_access, victim=lrfu_victim)
    int_columns = (-1,)
    float_columns = (-math.inf,)

    def __init__(self, capacity: int, seed: int = 0, decay: float = DEFAULT_LAMBDA) -> None:
        self.decay = decay
        super().__init__(capacity, seed)

    def globals_(self) -> tuple[list[int], list[float]]:
        return [], [self.decay]

    @classmethod
    def from_spec(cls, capacity: int, seed: int, argument: str | None, **_: object) -> LRFU:
        try:
            decay = DEFAULT_LAMBDA if argument is None else float(argument)
        except ValueError:
            raise HarnessError(f"lrfu takes lambda, a decay per step, e.g. lrfu:0.01 (got {argument!r})") from None
        if not 0 <= decay < math.inf:
            raise HarnessError(f"lrfu needs a finite lambda >= 0 (got {argument!r})")
        return cls(capacity, seed, decay)

    def reset(self) -> None:
        self.__init__(self.capacity, self.seed, self.decay)  # type: ignore[misc]

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "lambda_per_step": self.decay, "crf": "lifetime"}
