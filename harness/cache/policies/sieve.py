"""SIEVE (Zhang et al., NSDI 2024): one FIFO queue, a visited bit per key, a hand that sweeps from the
tail (oldest) towards the head (newest).

A hit sets the key's bit; a new key enters at the head unvisited. To evict, the hand, starting where it
stopped last (at the tail when it has none), clears visited bits and moves on until it finds an unvisited
key: that key leaves and the hand stays at the next newer key (past the head it wraps to the tail). Keys
never move within the queue. Harness reading: keys the current step needs are not candidates; the hand
passes over them like over visited keys (clearing their bit if set), so a step never evicts its own keys.
"""

from __future__ import annotations

import numpy as np

from harness.cache.compiled import (
    ACCESS_SIG,
    FIRST_COLUMN,
    KEY_SIG,
    NEWER,
    NONE,
    OLDEST,
    SIZE,
    VICTIM_SIG,
    WHERE,
    CompiledPolicy,
    Kernel,
    push,
    unlink,
)
from harness.cache.jit import KERNEL, njit
from harness.cache.registry import register_policy

QUEUE = 0
"""The one queue: oldest end = the tail, newest end = the head."""
HAND = 3
"""Int global: the key the hand points at (NONE: none, start at the tail)."""
VISITED = FIRST_COLUMN


@njit(ACCESS_SIG, **KERNEL)
def _access(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int, hit: bool) -> None:
    ki[key, VISITED] = 1


@njit(KEY_SIG, **KERNEL)
def _insert(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    ki[key, VISITED] = 0
    push(g, ki, QUEUE, key, WHERE)


@njit(KEY_SIG, **KERNEL)
def _evict(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    newer = ki[key, NEWER]
    unlink(g, ki, key, WHERE)
    if g[HAND] == key:
        g[HAND] = newer  # the hand stays where the victim was: its newer neighbour (NONE: the tail)


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
    key = g[HAND] if g[HAND] != NONE else g[QUEUE + OLDEST]
    # Each pass clears the bits of the candidates it passes, so the second pass finds one.
    for _ in range(2 * g[QUEUE + SIZE] + 1):
        if key == NONE:
            key = g[QUEUE + OLDEST]
        if mark[key] != tag and ki[key, VISITED] == 0:
            g[HAND] = key
            return key
        ki[key, VISITED] = 0
        key = ki[key, NEWER]
    return NONE


@register_policy
class Sieve(CompiledPolicy):
    name = "sieve"
    observes_misses = False
    kernel = Kernel(access=_access, insert=_insert, evict=_evict, victim=_victim)
    int_columns = (0,)
    queues = 1

    def globals_(self) -> tuple[list[int], list[float]]:
        return [NONE], []

    def describe(self) -> dict[str, object]:
        return {"name": self.name}
