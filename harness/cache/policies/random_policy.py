"""Random eviction: a uniformly drawn candidate, from a generator seeded per policy (same seed, same victims)."""

from __future__ import annotations

import numpy as np

from harness.cache.compiled import (
    EXPERT,
    LAYER,
    MT_WORDS,
    VICTIM_SIG,
    CompiledPolicy,
    Kernel,
    mt_below,
    mt_state,
)
from harness.cache.jit import njit
from harness.cache.registry import register_policy

RNG = 0
"""The generator's globals start here (`compiled.MT_WORDS` of them)."""
SCRATCH = RNG + MT_WORDS
"""Then room for the candidates of a draw: twice the capacity."""
SMALL = 32
"""Candidates up to which the draw ranks them by comparing every pair (beyond: by selection)."""


@njit(cache=True)
def _select(codes: np.ndarray, rows: np.ndarray, n: int, k: int) -> int:
    """rows[i] of the code with exactly k smaller ones among codes[:n] (distinct), by Hoare's quickselect, which
    reorders both arrays alike: O(n) on average, where sorting was O(n log n) and allocated (a global cache of
    256 slots replayed at 0.2 million accesses a second). The answer does not depend on the pivots."""
    low, high = 0, n - 1
    while low < high:
        pivot = codes[(low + high) // 2]
        i, j = low, high
        while i <= j:
            while codes[i] < pivot:
                i += 1
            while codes[j] > pivot:
                j -= 1
            if i <= j:
                codes[i], codes[j] = codes[j], codes[i]
                rows[i], rows[j] = rows[j], rows[i]
                i += 1
                j -= 1
        if k <= j:
            high = j
        elif k >= i:
            low = i
        else:
            return rows[k]
    return rows[k]


@njit(VICTIM_SIG, cache=True)  # allocates for wide candidate lists: not KERNEL
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
    size = len(resident)
    # The candidates' keys and rows, in the globals' scratch (room for the policy's capacity, which bounds the
    # candidates; anything wider gets arrays of its own).
    scratch = g[SCRATCH:] if len(g) - SCRATCH >= 2 * size else np.empty(2 * size, dtype=np.int64)
    codes, rows = scratch[:size], scratch[size : 2 * size]
    n = 0
    for key in resident:
        if key >= 0 and mark[key] != tag:
            codes[n] = (ki[key, LAYER] << 32) | ki[key, EXPERT]
            rows[n] = key
            n += 1
    if n == 0:
        return -1
    k = mt_below(g, RNG, n)
    if n > SMALL:
        return _select(codes, rows, n, k)
    # The candidate with k smaller keys (keys are distinct): n^2 comparisons in loops without branches, faster
    # than sorting for a few dozen candidates.
    for i in range(n):
        below = 0
        for j in range(n):
            below += codes[j] < codes[i]
        if below == k:
            return rows[i]
    return -1


@register_policy
class RandomEviction(CompiledPolicy):
    name = "random"
    observes_misses = False
    kernel = Kernel(victim=_victim)

    def globals_(self) -> tuple[np.ndarray | list[int], list[float]]:
        return mt_state(self.seed) + [0] * (2 * self.capacity), []

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "seed": self.seed}
