"""Random eviction: a uniformly drawn candidate, from a generator seeded per policy (same seed, same victims)."""

from __future__ import annotations

import numpy as np

from harness.cache.compiled import EXPERT, LAYER, VICTIM_SIG, CompiledPolicy, Kernel, mt_below, mt_state
from harness.cache.ranked import njit
from harness.cache.registry import register_policy

RNG = 0
"""The generator's globals start here (`compiled.MT_WORDS` of them)."""
SMALL = 32
"""Candidates up to which the draw sorts them by insertion."""


@njit(cache=True)
def _row(ki: np.ndarray, layer: int, expert: int, resident: np.ndarray) -> int:
    """The row among `resident` of key (layer, expert)."""
    for key in resident:
        if key >= 0 and ki[key, LAYER] == layer and ki[key, EXPERT] == expert:
            return key
    return -1


@njit(VICTIM_SIG, cache=True)
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
    """A uniform draw among the candidates sorted by key, so that it depends on the seed and the candidates only."""
    codes = np.empty(len(resident), dtype=np.int64)
    n = 0
    for key in resident:
        if key >= 0 and mark[key] != tag:
            codes[n] = (ki[key, LAYER] << 32) | ki[key, EXPERT]
            n += 1
    if n == 0:
        return -1
    if n > SMALL:
        codes[:n].sort()
    else:  # insertion sort: numba's sort takes ~0.4 us on 16 keys, several times the rest of the draw
        for i in range(1, n):
            code, j = codes[i], i - 1
            while j >= 0 and codes[j] > code:
                codes[j + 1] = codes[j]
                j -= 1
            codes[j + 1] = code
    chosen = codes[mt_below(g, RNG, n)]
    return _row(ki, chosen >> 32, chosen & 0xFFFFFFFF, resident)


@register_policy
class RandomEviction(CompiledPolicy):
    name = "random"
    observes_misses = False
    kernel = Kernel(victim=_victim)

    def globals_(self) -> tuple[np.ndarray | list[int], list[float]]:
        return mt_state(self.seed), []

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "seed": self.seed}
