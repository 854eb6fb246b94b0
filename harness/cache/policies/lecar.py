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
    CompiledPolicy,
    Kernel,
    mt_random,
    mt_state,
    push,
    unlink,
)
from harness.cache.jit import KERNEL, njit
from harness.cache.registry import register_policy
from harness.keys import ExpertKey

COUNT, STAMP = 1, 2
"""What `touch` does to a key: bump its lifetime count, renew its stamp (flags, combined with |)."""


@njit("void(int64[:], int64, int64, int64)", cache=True)
def touch(state: np.ndarray, at: int, key: int, how: int) -> None:
    """state[at:] is [clock, stamp_0, count_0, stamp_1, count_1, ...] (an offset, not a view: a view costs
    reference counting, ~20 ns a call, where a policy keeps several such states in one array). An access
    bumps the count where the policy counts (COUNT); a hit's access or an insert renews the stamp to the
    clock, which then ticks."""
    if how & COUNT:
        state[at + 2 + 2 * key] += 1
    if how & STAMP:
        state[at + 1 + 2 * key] = state[at]
        state[at] += 1


@njit("int64(int64[:], int64, boolean, int64[:], int64[:], int64)", cache=True)
def lowest(state: np.ndarray, at: int, counted: bool, keys: np.ndarray, skip: np.ndarray, tag: int) -> int:
    """The key of lowest rank in state[at:] (`touch`), (count, stamp) or stamp alone, among `keys` (those >= 0
    whose `skip` mark is not `tag`); -1 if none."""
    # Selects, not branches: which key ranks lower is a coin toss that the branch predictor loses (a scan
    # 20-40% faster on 16 to 32 keys).
    best, best_count, best_stamp = -1, 0, 0
    for key in keys:
        usable = key >= 0 and skip[key] != tag
        c = state[at + 2 + 2 * key] if counted else 0
        stamp = state[at + 1 + 2 * key]
        lower = usable & ((best < 0) | (c < best_count) | ((c == best_count) & (stamp < best_stamp)))
        best = key if lower else best
        best_count = c if lower else best_count
        best_stamp = stamp if lower else best_stamp
    return best


LEARNING_RATE = 0.45
DISCOUNT_BASE = 0.005

HIST_LRU, HIST_LFU = 0, 1
"""The experts' histories of their victims (queues, oldest first)."""
CAPACITY, CLOCK, RNG = 6, 7, 8
"""Int globals after the queues': the capacity, the accesses seen (the age unit of the histories), the
generator; then the state of the LRU expert and of the LFU expert (`touch`), 1 + 2 x keys each."""
EXPERTS = RNG + MT_WORDS
W_LRU, DISCOUNT = 0, 1
CHOSEN = FIRST_COLUMN
"""Key column: the expert that chose the key as the victim (1 LRU, 2 LFU, 0 none), until its eviction files it."""
LINKS = (FIRST_COLUMN + 1, FIRST_COLUMN + 4)
"""Each history's links (a key the engine places without a miss stays in a history: it can be in both)."""
EVICTED_AT = (FIRST_COLUMN + 7, FIRST_COLUMN + 8)
"""Key columns: the clock at the key's eviction, in each history."""


@njit(**KERNEL)
def _experts(ki: np.ndarray) -> tuple[int, int]:
    """Where the LRU and the LFU expert's states start in the globals."""
    return EXPERTS, EXPERTS + 1 + 2 * ki.shape[0]


@njit(ACCESS_SIG, **KERNEL)
def _access(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int, hit: bool) -> None:
    g[CLOCK] += 1
    lru, lfu = _experts(ki)
    if hit:
        touch(g, lru, key, STAMP)
        touch(g, lfu, key, STAMP | COUNT)
        return
    touch(g, lfu, key, COUNT)  # LRU ignores a miss
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
    lru, lfu = _experts(ki)
    by_lru = mt_random(g, RNG) < gf[W_LRU]
    key = lowest(g, lru, False, resident, mark, tag) if by_lru else lowest(g, lfu, True, resident, mark, tag)
    if key >= 0:
        ki[key, CHOSEN] = 1 if by_lru else 2
    return key


@njit(KEY_SIG, **KERNEL)
def _evict(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    chosen = ki[key, CHOSEN]
    ki[key, CHOSEN] = 0
    if chosen == 0:
        return  # dropped by the engine, not chosen by either expert: no regret to learn from
    history = HIST_LRU if chosen == 1 else HIST_LFU
    push(g, ki, history, key, LINKS[history])  # a key already there keeps its place, with the new clock
    ki[key, EVICTED_AT[history]] = g[CLOCK]
    if g[3 * history + SIZE] > g[CAPACITY]:
        unlink(g, ki, g[3 * history + OLDEST], LINKS[history])


@njit(KEY_SIG, **KERNEL)
def _insert(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    lru, lfu = _experts(ki)
    touch(g, lru, key, STAMP)
    touch(g, lfu, key, STAMP)


@register_policy
class LeCaR(CompiledPolicy):
    name = "lecar"
    kernel = Kernel(access=_access, insert=_insert, evict=_evict, victim=_victim)
    int_columns = (0, *(NONE,) * 6, 0, 0)
    queues = 2

    def globals_(self) -> tuple[np.ndarray | list[int], list[float]]:
        # The experts' states start empty (no key): clock 0 each.
        return [self.capacity, 0, *mt_state(self.seed), 0, 0], [0.5, DISCOUNT_BASE ** (1.0 / self.capacity)]

    def bind(self, keys: list[ExpertKey]) -> np.ndarray:
        old = self.slots
        rows = super().bind(keys)
        grown = self.slots - old
        if grown:  # each expert's state takes (stamp, count) per key: grow both
            lru_end = EXPERTS + 1 + 2 * old
            pad = np.zeros(2 * grown, dtype=np.int64)
            self.g = np.concatenate([self.g[:lru_end], pad, self.g[lru_end:], pad])
        return rows

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
