"""LeCaR (Vietri et al., HotStorage 2018): regret-weighted choice between LRU and LFU, composed of both.

Each eviction draws LRU with probability w_lru (else LFU, lifetime counts) from a seeded generator;
the victim goes into that expert's history (at most `capacity` keys each). A miss on a key in LRU's
history means LRU chose badly: LFU's weight grows by exp(learning_rate * discount^age), where age is
the number of accesses since that eviction; symmetrically for LFU's history. Weights are then
normalised. Learning rate 0.45 and discount 0.005^(1/capacity) are the paper's defaults.
"""

from __future__ import annotations

import math

import numpy as np

from harness.cache.compiled import (
    ACCESS_SIG,
    FIRST_COLUMN,
    KEY_SIG,
    MT_WORDS,
    NONE,
    OLDEST,
    SIZE,
    VICTIM_SIG,
    Kernel,
    mt_random,
    mt_state,
    push,
    unlink,
)
from harness.cache.heaps import HeapPolicy
from harness.cache.jit import KERNEL, njit
from harness.cache.policies.lfu import HEAP, LFU_COLUMNS, lfu_access, lfu_evict, lfu_globals, lfu_insert, lfu_victim
from harness.cache.queues import leave, move_to_newest, oldest_unmarked
from harness.cache.registry import register_policy

LEARNING_RATE = 0.45
DISCOUNT_BASE = 0.005

HIST_LRU, HIST_LFU, RECENCY = 0, 1, 2
"""The experts' histories of their victims (queues, oldest first), and the LRU expert's recency queue of the
resident keys (a hit's access or an insert moves a key to its newest end)."""
CAPACITY, CLOCK, RNG = 9, 10, 11
"""Int globals after the queues': the capacity, the accesses seen (the age unit of the histories), the
generator; then the LFU expert's globals (`policies.lfu`: its clock and heap of the resident keys)."""
LFU_AT = RNG + MT_WORDS
W_LRU, DISCOUNT = 0, 1
CHOSEN = FIRST_COLUMN
"""Key column: the expert that chose the key as the victim (1 LRU, 2 LFU, 0 none), until its eviction files it."""
LINKS = (FIRST_COLUMN + 1, FIRST_COLUMN + 4, FIRST_COLUMN + 7)
"""Each history's links (a key the engine places without a miss stays in a history: it can be in both), then the
recency queue's."""
EVICTED_AT = (FIRST_COLUMN + 10, FIRST_COLUMN + 11)
"""Key columns: the clock at the key's eviction, in each history."""
LFU_COLUMN = FIRST_COLUMN + 12
"""The LFU expert's key columns start here (`policies.lfu`: count, stamp, place in its heap)."""


@njit(ACCESS_SIG, **KERNEL, inline="always")
def _access(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int, hit: bool) -> None:
    g[CLOCK] += 1
    lfu_access(g, ki, LFU_AT, LFU_COLUMN, key, hit)
    if hit:
        move_to_newest(g, ki, RECENCY, key, LINKS[RECENCY])
        return
    # LRU ignores a miss
    w_lru, w_lfu = gf[W_LRU], 1.0 - gf[W_LRU]
    if ki[key, LINKS[HIST_LRU]] == HIST_LRU:
        w_lfu *= math.exp(LEARNING_RATE * gf[DISCOUNT] ** (g[CLOCK] - ki[key, EVICTED_AT[HIST_LRU]]))
        unlink(g, ki, key, LINKS[HIST_LRU])
    elif ki[key, LINKS[HIST_LFU]] == HIST_LFU:
        w_lru *= math.exp(LEARNING_RATE * gf[DISCOUNT] ** (g[CLOCK] - ki[key, EVICTED_AT[HIST_LFU]]))
        unlink(g, ki, key, LINKS[HIST_LFU])
    else:
        return
    gf[W_LRU] = w_lru / (w_lru + w_lfu)


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
    by_lru = mt_random(g, RNG) < gf[W_LRU]
    key = oldest_unmarked(g, ki, RECENCY, LINKS[RECENCY], mark, tag) if by_lru else lfu_victim(g, LFU_AT, mark, tag)
    if key >= 0:
        ki[key, CHOSEN] = 1 if by_lru else 2
    return key


@njit(KEY_SIG, **KERNEL, inline="always")
def _evict(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    leave(g, ki, key, LINKS[RECENCY])
    lfu_evict(g, ki, LFU_AT, LFU_COLUMN, key)
    chosen = ki[key, CHOSEN]
    ki[key, CHOSEN] = 0
    if chosen == 0:
        return  # dropped by the engine, not chosen by either expert: no regret to learn from
    history = HIST_LRU if chosen == 1 else HIST_LFU
    push(g, ki, history, key, LINKS[history])  # a key already there keeps its place, with the new clock
    ki[key, EVICTED_AT[history]] = g[CLOCK]
    if g[3 * history + SIZE] > g[CAPACITY]:
        unlink(g, ki, g[3 * history + OLDEST], LINKS[history])


@njit(KEY_SIG, **KERNEL, inline="always")
def _insert(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    move_to_newest(g, ki, RECENCY, key, LINKS[RECENCY])
    lfu_insert(g, ki, LFU_AT, LFU_COLUMN, key)


@register_policy
class LeCaR(HeapPolicy):
    name = "lecar"
    kernel = Kernel(access=_access, insert=_insert, evict=_evict, victim=_victim)
    int_columns = (0, *(NONE,) * 9, 0, 0, *LFU_COLUMNS)
    queues = 3
    heap_at = LFU_AT + HEAP

    def globals_(self) -> tuple[np.ndarray | list[int], list[float]]:
        weights = [0.5, DISCOUNT_BASE ** (1.0 / self.capacity)]
        return [self.capacity, 0, *mt_state(self.seed), *lfu_globals(self.capacity)], weights

    @property
    def w_lru(self) -> float:
        return float(self.gf[W_LRU])

    @property
    def discount(self) -> float:
        return float(self.gf[DISCOUNT])

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "lfu_counts": "lifetime",
            "learning_rate": LEARNING_RATE,
            "discount": self.discount,
            "w_lru": self.w_lru,
        }
