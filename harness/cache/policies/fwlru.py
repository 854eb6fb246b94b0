"""Frequency-weighted LRU (Flash-MoE's CUDA port): evict the resident expert with the smallest
`w x access_count + last_used`, `last_used` being the token step of its last access.

Spec `fwlru` (w = 10, the port's value) or `fwlru:W`. Reading of `access_count` (the port's cache-entry
field; its reset rule was not read here): accesses since the expert was last loaded, the load counting as
one, so an evicted expert starts again from one. Ties go to the smaller (last_used, key).

A resident key's value changes only when it is used, so the resident keys are kept in a heap by (value,
last_used, key) (`harness.cache.heaps`): the victim is found at its top, where a scan of every resident key
took O(capacity) a miss.
"""

from __future__ import annotations

import numpy as np

from harness.cache.compiled import ACCESS_SIG, FIRST_COLUMN, KEY_SIG, NONE, VICTIM_SIG, Kernel
from harness.cache.heaps import HeapPolicy, heap_globals, heap_put, heap_remove, key_code, lowest_unmarked, sortable
from harness.cache.jit import KERNEL, njit
from harness.cache.registry import register_policy
from harness.errors import HarnessError

DEFAULT_WEIGHT = 10.0
"""Steps of recency one access is worth (Flash-MoE's CUDA port: `access_count * 10 + last_used`)."""

COUNT, LAST, PLACE = FIRST_COLUMN, FIRST_COLUMN + 1, FIRST_COLUMN + 2
"""Key columns: accesses since the load, last use (`ABSENT` for a key not resident and not used since), the key's
place in the heap (NONE: not resident)."""
ABSENT = -(2**62)
WEIGHT = 0
"""Float global: the weight."""
HEAP = 0
"""The heap's int globals start here."""


@njit(KEY_SIG, **KERNEL, inline="always")
def _rank(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    """The key's place in the heap by (w x count + last use, last use, key), where it is resident."""
    value = gf[WEIGHT] * ki[key, COUNT] + ki[key, LAST]
    heap_put(g, ki, HEAP, key, PLACE, sortable(value), ki[key, LAST], key_code(ki, key))


@njit(ACCESS_SIG, **KERNEL, inline="always")
def _access(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int, hit: bool) -> None:
    if hit:
        ki[key, COUNT] += 1
    ki[key, LAST] = now
    if ki[key, PLACE] != NONE:
        _rank(g, gf, ki, kf, key, now)


@njit(KEY_SIG, **KERNEL, inline="always")
def _insert(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    # A miss was seen by access (last used = now); a placed key (engine) was never used: now.
    ki[key, COUNT] = 1
    if ki[key, LAST] == ABSENT:
        ki[key, LAST] = now
    _rank(g, gf, ki, kf, key, now)


@njit(KEY_SIG, **KERNEL, inline="always")
def _evict(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    ki[key, LAST] = ABSENT
    heap_remove(g, ki, HEAP, key, PLACE)


@njit(VICTIM_SIG, **KERNEL, inline="always")
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
    """The smallest (w x count + last use, last use, key): the heap's lowest unmarked."""
    return lowest_unmarked(g, HEAP, mark, tag)


@register_policy
class FrequencyWeightedLRU(HeapPolicy):
    name = "fwlru"
    kernel = Kernel(access=_access, insert=_insert, evict=_evict, victim=_victim)
    int_columns = (0, ABSENT, NONE)
    heap_at = HEAP

    def __init__(self, capacity: int, seed: int = 0, weight: float = DEFAULT_WEIGHT) -> None:
        self.weight = weight
        super().__init__(capacity, seed)

    def globals_(self) -> tuple[list[int], list[float]]:
        return heap_globals(self.capacity), [self.weight]

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
