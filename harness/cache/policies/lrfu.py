"""LRFU (Lee et al., IEEE ToC 2001): evict the resident expert with the smallest combined recency and
frequency, `CRF(now) = sum over its past accesses t_i of (1/2)^(lambda x (now - t_i))`.

Spec `lrfu` (lambda = 0.01 per token step, a documented default: an access loses half its weight in 100
steps) or `lrfu:LAMBDA`. lambda = 0 is LFU with lifetime counts; a large lambda tends to LRU.

Incremental form: a key keeps only `s = log2(CRF(t_last)) + lambda x t_last`, updated at each access as
`s = log2(1 + 2^(s_old - lambda x now)) + lambda x now`. Since `log2 CRF(now) = s - lambda x now` for every
key, ranking by `s` is ranking by CRF at any time, without decaying every key each step and without the
underflow of `2^(-lambda x age)`. CRF values are lifetime (kept after eviction), as `lfu`'s counts. Ties
go to the least recent last access, then the smaller key. An untouched key's `s` does not change, so the
resident keys are kept in a heap by (s, last access, key) (`harness.cache.heaps`): the victim is found at its
top, where a scan of every resident key took O(capacity) a miss.
"""

from __future__ import annotations

import math

import numpy as np

from harness.cache.compiled import ACCESS_SIG, FIRST_COLUMN, KEY_SIG, NONE, VICTIM_SIG, Kernel
from harness.cache.heaps import (
    HeapPolicy,
    heap_globals,
    heap_put,
    heap_remove,
    heap_rerank,
    key_code,
    lowest_unmarked,
    sortable,
)
from harness.cache.jit import KERNEL, njit
from harness.cache.registry import register_policy
from harness.errors import HarnessError

DEFAULT_LAMBDA = 0.01
"""Decay per token step (half-life 1/lambda = 100 steps); a documented default, not the paper's."""

LAST, PLACE = FIRST_COLUMN, FIRST_COLUMN + 1
"""Int key columns: the last access (-1: none); `lrfu`'s: the key's place in the heap (NONE: not resident)."""
SCORE = 0
"""Float key column: log2(CRF at last access) + lambda x last access (-inf: never accessed, CRF 0)."""
DECAY = 0
"""Float global: lambda."""
HEAP = 0
"""Where `lrfu`'s heap starts in its int globals."""


@njit(ACCESS_SIG, **KERNEL, inline="always")
def lrfu_access(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int, hit: bool) -> None:
    base = gf[DECAY] * now
    old = kf[key, SCORE]
    crf = 1.0 if old == -np.inf else 1.0 + 2.0 ** (old - base)
    kf[key, SCORE] = math.log2(crf) + base
    ki[key, LAST] = now


@njit(KEY_SIG, **KERNEL, inline="always")
def _rank(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    """The key's place in the heap after its rank (s, last access, key) changed, or as it is inserted."""
    heap_put(g, ki, HEAP, key, PLACE, sortable(kf[key, SCORE]), ki[key, LAST], key_code(ki, key))


@njit(ACCESS_SIG, **KERNEL, inline="always")
def _access(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int, hit: bool) -> None:
    lrfu_access(g, gf, ki, kf, key, now, hit)
    heap_rerank(g, ki, HEAP, key, PLACE, sortable(kf[key, SCORE]), ki[key, LAST], key_code(ki, key))


@njit(KEY_SIG, **KERNEL, inline="always")
def _evict(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    heap_remove(g, ki, HEAP, key, PLACE)


@njit(VICTIM_SIG, **KERNEL, inline="always")
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
    return lowest_unmarked(g, HEAP, mark, tag)


LRFU_KERNEL = Kernel(access=_access, insert=_rank, evict=_evict, victim=lrfu_victim)
"""`lrfu`'s decisions (`lrfu-admit` adds its admission to them)."""


@register_policy
class LRFU(HeapPolicy):
    name = "lrfu"
    kernel = LRFU_KERNEL
    int_columns = (-1, NONE)
    float_columns = (-math.inf,)
    heap_at = HEAP

    def __init__(self, capacity: int, seed: int = 0, decay: float = DEFAULT_LAMBDA) -> None:
        self.decay = decay
        super().__init__(capacity, seed)

    def globals_(self) -> tuple[list[int], list[float]]:
        return heap_globals(self.capacity), [self.decay]

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
