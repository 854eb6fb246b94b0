"""ARC (Megiddo & Modha, FAST 2003) over expert keys: adaptive split between recency and frequency.

Lists, each from least to most recent: T1 (resident, seen once since it entered), T2 (resident, seen
again), B1 and B2 (ghosts: keys recently evicted from T1 and T2, no slot). The target size p of T1
grows on a B1 ghost hit and shrinks on a B2 ghost hit. The shared cache loop decides when to evict;
ARC's REPLACE rule picks the list, and the least recent key of that list that the step does not need.
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

T1, T2, B1, B2 = 0, 1, 2, 3
"""The lists, as queues (oldest end = least recent); their globals are g[3q:3q+3]."""
CAPACITY = 12
"""Int global after the queues'."""
P = 0
"""Float global: the target size of T1, in slots."""
FROM_B2, TO_T2 = FIRST_COLUMN, FIRST_COLUMN + 1
"""Key flags: a miss of this step that was a B2 ghost; a miss of this step that was a ghost (it enters T2)."""
IN_B1, IN_B2 = FIRST_COLUMN + 2, FIRST_COLUMN + 5
"""Links of the ghost lists, apart from T1's and T2's (`WHERE`...): a key the engine places without a miss stays
in its ghost list, so a key can be in a T list, B1 and B2 at once."""


@njit(ACCESS_SIG, **KERNEL)
def _access(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int, hit: bool) -> None:
    if hit:
        # Resident and seen again: most recent end of T2.
        unlink(g, ki, key, WHERE)
        push(g, ki, T2, key, WHERE)
        return
    c = g[CAPACITY]
    b1, b2 = g[3 * B1 + SIZE], g[3 * B2 + SIZE]
    if ki[key, IN_B1] == B1:
        gf[P] = min(float(c), gf[P] + max(b2 / b1, 1.0))
        unlink(g, ki, key, IN_B1)
        ki[key, TO_T2] = 1
    elif ki[key, IN_B2] == B2:
        gf[P] = max(0.0, gf[P] - max(b1 / b2, 1.0))
        unlink(g, ki, key, IN_B2)
        ki[key, TO_T2] = 1
        ki[key, FROM_B2] = 1


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
    n1 = g[3 * T1 + SIZE]
    prefer_t1 = n1 > 0 and (n1 > gf[P] or (ki[incoming, FROM_B2] == 1 and n1 == gf[P]))
    first, second = (T1, T2) if prefer_t1 else (T2, T1)
    for q in (first, second):
        key = g[3 * q + OLDEST]
        while key != NONE:
            if mark[key] != tag:
                return key
            key = ki[key, NEWER]
    return NONE


@njit(KEY_SIG, **KERNEL)
def _evict(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    in_t1 = ki[key, WHERE] == T1
    unlink(g, ki, key, WHERE)
    if in_t1:
        push(g, ki, B1, key, IN_B1)
    else:
        push(g, ki, B2, key, IN_B2)


@njit(KEY_SIG, **KERNEL)
def _insert(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    if ki[key, TO_T2]:
        ki[key, TO_T2] = 0
        ki[key, FROM_B2] = 0
        push(g, ki, T2, key, WHERE)
    else:
        push(g, ki, T1, key, WHERE)
    # Ghost directory bounds of ARC: |T1| + |B1| <= c and the four lists together <= 2c.
    c = g[CAPACITY]
    while g[3 * B1 + SIZE] and g[3 * T1 + SIZE] + g[3 * B1 + SIZE] > c:
        unlink(g, ki, g[3 * B1 + OLDEST], IN_B1)
    while g[3 * B2 + SIZE] and g[3 * T1 + SIZE] + g[3 * T2 + SIZE] + g[3 * B1 + SIZE] + g[3 * B2 + SIZE] > 2 * c:
        unlink(g, ki, g[3 * B2 + OLDEST], IN_B2)


@register_policy
class ARC(CompiledPolicy):
    name = "arc"
    kernel = Kernel(access=_access, insert=_insert, evict=_evict, victim=_victim)
    int_columns = (0, 0, *(NONE,) * 6)
    queues = 4

    def globals_(self) -> tuple[list[int], list[float]]:
        return [self.capacity], [0.0]

    @property
    def p(self) -> float:
        """The target size of T1, in slots."""
        return float(self.gf[P])

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "p": self.p}
