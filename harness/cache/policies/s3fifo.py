"""S3-FIFO (Yang et al., SOSP 2023): a small FIFO, a main FIFO and a ghost FIFO of evicted keys.

- Sizes: the small queue's target is 10% of the capacity (at least one slot); the ghost remembers as many
  keys as the main queue's share (capacity - small target).
- A hit increments the key's counter, capped at 3. A new key enters the small queue at its head, or the
  main queue when it is in the ghost (and leaves the ghost).
- Eviction: when the small queue holds at least its target (or main is empty), from the small queue's
  tail: a key that was hit since it entered (counter >= 1, POLICIES.md) moves to main's head with its
  counter reset, and the next is examined; an unhit key is the victim and goes to the ghost. Otherwise from
  main's tail: a key with counter > 0 is reinserted at the head with the counter decremented; a key at 0 is
  the victim (main's victims leave no ghost).
Harness reading: keys the current step needs are not candidates; the scans pass over them unchanged.
"""

from __future__ import annotations

import numpy as np

from harness.cache.compiled import (
    ACCESS_SIG,
    FIRST_COLUMN,
    KEY_SIG,
    NEWER,
    NEWEST,
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

SMALL_SHARE = 0.1
"""The small queue's share of the capacity (the paper's 10%)."""
MAX_COUNT = 3
"""Cap of the per-key access counter (the paper's two bits)."""

SMALL, MAIN, GHOST = 0, 1, 2
"""The queues (oldest end = the tail, newest = the head); their globals are g[3q:3q+3]."""
SMALL_TARGET, GHOST_SIZE = 9, 10
"""Int globals after the queues'."""
COUNT = FIRST_COLUMN


@njit(ACCESS_SIG, **KERNEL)
def _access(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int, hit: bool) -> None:
    if hit:
        ki[key, COUNT] = min(MAX_COUNT, ki[key, COUNT] + 1)


@njit(KEY_SIG, **KERNEL)
def _insert(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    ki[key, COUNT] = 0
    if ki[key, WHERE] == GHOST:
        unlink(g, ki, key, WHERE)
        push(g, ki, MAIN, key, WHERE)
    else:
        push(g, ki, SMALL, key, WHERE)


@njit(KEY_SIG, **KERNEL)
def _evict(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    small = ki[key, WHERE] == SMALL
    unlink(g, ki, key, WHERE)
    if small:
        push(g, ki, GHOST, key, WHERE)
        if g[3 * GHOST + SIZE] > g[GHOST_SIZE]:
            unlink(g, ki, g[3 * GHOST + OLDEST], WHERE)


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
    if g[3 * SMALL + SIZE] >= g[SMALL_TARGET] or g[3 * MAIN + SIZE] == 0:
        key = g[3 * SMALL + OLDEST]
        while key != NONE:
            after = ki[key, NEWER]
            if mark[key] != tag:
                if ki[key, COUNT] == 0:
                    return key
                unlink(g, ki, key, WHERE)
                push(g, ki, MAIN, key, WHERE)
                ki[key, COUNT] = 0
            key = after
    found = False
    key = g[3 * MAIN + OLDEST]
    while key != NONE and not found:
        found = mark[key] != tag
        key = ki[key, NEWER]
    # Each pass over main decrements every candidate's counter: at most MAX_COUNT + 1 passes.
    while found:
        last = g[3 * MAIN + NEWEST]  # a pass ends with the key that was newest when it began
        key = g[3 * MAIN + OLDEST]
        while True:
            after = ki[key, NEWER]
            if mark[key] != tag:
                if ki[key, COUNT] == 0:
                    return key
                unlink(g, ki, key, WHERE)
                push(g, ki, MAIN, key, WHERE)
                ki[key, COUNT] -= 1
            if key == last:
                break
            key = after
    key = g[3 * SMALL + OLDEST]  # only reached when main holds no candidate at all
    while key != NONE:
        if mark[key] != tag:
            return key
        key = ki[key, NEWER]
    return NONE


@register_policy
class S3FIFO(CompiledPolicy):
    name = "s3fifo"
    observes_misses = False
    kernel = Kernel(access=_access, insert=_insert, evict=_evict, victim=_victim)
    int_columns = (0,)
    queues = 3

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.small_target = max(1, round(SMALL_SHARE * capacity))
        self.ghost_size = max(1, capacity - self.small_target)
        super().__init__(capacity, seed)

    def globals_(self) -> tuple[list[int], list[float]]:
        return [self.small_target, self.ghost_size], []

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "small_slots": self.small_target, "ghost_keys": self.ghost_size}
