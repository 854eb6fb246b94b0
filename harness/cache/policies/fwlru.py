"""Frequency-weighted LRU (Flash-MoE's CUDA port): evict the resident expert with the smallest
`w x access_count + last_used`, `last_used` being the token step of its last access.

Spec `fwlru` (w = 10, the port's value) or `fwlru:W`. Reading of `access_count` (the port's cache-entry
field; its reset rule was not read here): accesses since the expert was last loaded, the load counting as
one, so an evicted expert starts again from one. Ties go to the smaller (last_used, key).
"""

from __future__ import annotations

import numpy as np

from harness.cache.compiled import ACCESS_SIG, EXPERT, FIRST_COLUMN, KEY_SIG, LAYER, VICTIM_SIG, CompiledPolicy, Kernel
from harness.cache.jit import KERNEL, njit
from harness.cache.registry import register_policy
from harness.errors import HarnessError

DEFAULT_WEIGHT = 10.0
"""Steps of recency one access is worth (Flash-MoE's CUDA port: `access_count * 10 + last_used`)."""

COUNT, LAST = FIRST_COLUMN, FIRST_COLUMN + 1
"""Key columns: accesses since the load, last use (`ABSENT` for a key not resident and not used since)."""
ABSENT = -(2**62)
WEIGHT = 0
"""Float global: the weight."""


@njit(ACCESS_SIG, **KERNEL)
def _access(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int, hit: bool) -> None:
    if hit:
        ki[key, COUNT] += 1
    ki[key, LAST] = now


@njit(KEY_SIG, **KERNEL)
def _insert(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    # A miss was seen by access (last used = now); a placed key (engine) was never used: now.
    ki[key, COUNT] = 1
    if ki[key, LAST] == ABSENT:
        ki[key, LAST] = now


@njit(KEY_SIG, **KERNEL)
def _evict(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    ki[key, LAST] = ABSENT


@njit(VICTIM_SIG, **KERNEL)
def _victim(
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
    """The smallest (w x count + last use, last use, key)."""
    w = gf[WEIGHT]
    best, best_rank = -1, (0.0, 0, 0, 0)
    for key in resident:
        if key >= 0 and mark[key] != tag:
            rank = (w * ki[key, COUNT] + ki[key, LAST], ki[key, LAST], ki[key, LAYER], ki[key, EXPERT])
            if best < 0 or rank < best_rank:
                best, best_rank = key, rank
    return best


@register_policy
class FrequencyWeightedLRU(CompiledPolicy):
    name = "fwlru"
    kernel = Kernel(access=_access, insert=_insert, evict=_evict, victim=_victim)
    int_columns = (0, ABSENT)

    def __init__(self, capacity: int, seed: int = 0, weight: float = DEFAULT_WEIGHT) -> None:
        self.weight = weight
        super().__init__(capacity, seed)

    def globals_(self) -> tuple[list[int], list[float]]:
        return [], [self.weight]

    @classmethod
    def from_spec(cls, capacity: int, seed: int, argument: str | None, **_: object) -> FrequencyWeightedLRU:
        try:
            weight = DEFAULT_WEIGHT if argument is None else float(argument)
        except ValueError:
            raise HarnessError(f"fwlru takes a weight in steps per access, e.g. fwlru:10 (got {argument!r})") from None
        if not weight >= 0:
            raise HarnessError(f"fwlru needs a weight >= 0 (got {argument!r})")
        return cls(capacity, seed, weight)

    def reset(self) -> None:
        self.__init__(self.capacity, self.seed, self.weight)  # type: ignore[misc]

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "weight_steps": self.weight, "count": "accesses since the load"}
