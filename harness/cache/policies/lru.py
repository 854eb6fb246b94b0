"""LRU: evict the resident expert whose last access is oldest.

The resident keys stand in a recency queue (`harness.cache.queues`): a hit's access or an insert moves a key to
the newest end, and the victim is the oldest key the step does not need, found in a step or two (the keys a step
marks were just touched, so the walk from the oldest end rarely passes one), where a scan of every resident
key's stamp took one step a slot (a global cache of 256 slots replayed 3.5 million accesses a second).
"""

from __future__ import annotations

import numpy as np

from harness.cache.compiled import ACCESS_SIG, KEY_SIG, VICTIM_SIG, WHERE, CompiledPolicy, Kernel, dequeue
from harness.cache.jit import KERNEL, njit
from harness.cache.queues import move_to_newest, oldest_unmarked
from harness.cache.registry import register_policy

QUEUE = 0
"""The recency queue: oldest end first."""


@njit(ACCESS_SIG, **KERNEL, inline="always")
def _access(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int, hit: bool) -> None:
    move_to_newest(g, ki, QUEUE, key, WHERE)  # hits only: a miss is placed by the insert


@njit(KEY_SIG, **KERNEL, inline="always")
def _insert(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    move_to_newest(g, ki, QUEUE, key, WHERE)


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
    return oldest_unmarked(g, ki, QUEUE, WHERE, mark, tag)


@register_policy
class LRU(CompiledPolicy):
    """The least recently touched (hit or insert) leaves first: a recency queue. Within one step the hits, by
    expert id, are touched before the misses are inserted, by expert id."""

    name = "lru"
    observes_misses = False
    kernel = Kernel(access=_access, insert=_insert, evict=dequeue, victim=_victim)
    queues = 1
