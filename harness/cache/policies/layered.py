"""Two global-scope policies built on the fixed order in which MoE layers are visited (layer 0, 1, ..., the
last, then layer 0 of the next token step).

When the step of layer `l` needs a slot, a key of layer `j` is next needed, at the earliest, when the
visiting order reaches `j` again: after `(j - l) mod n` layer visits, where the layer just computed (`j = l`)
waits longest (n: a full token step) and the next layer (`j = l + 1`) is needed first. Both policies rank
candidates by that distance; they differ in how it is weighed against recency. Layer ids ascending are
the visiting order; the distance is computed on ids (`j - l`, plus a constant larger than any id range
when `j <= l`), which orders layers exactly as positions would, without knowing the set of layers. In
per-layer scope every candidate shares the incoming key's layer and both reduce to LRU.

- `least-stale` (SpecMD, Apple 2026, from its abstract only; this precise rule is the harness's reading):
  evict from the layer whose next visit is the latest, i.e. the layer being computed first, then the one
  computed before it, and so on back around the order; within that layer, the least recently used key.
  Recency is used only inside a layer.
- `layer-lru` (after Angelopoulos et al. 2025, a paging model of layered caches; the exact rule there was
  not read, this is the harness's): LRU on token steps, where a layer's keys are not evicted in favour of a
  layer further away in the visiting order. The victim is the candidate whose last use is the oldest token
  step; among keys last used in the same step, the one whose layer is visited again the latest. Plain LRU
  instead orders a step's keys by the time of use, so the previous step's keys of the next layers (used
  last in that step's visiting order, but needed soonest) are evicted first.
Ties beyond these rules go to the smaller key.
"""

from __future__ import annotations

import numpy as np

from harness.cache.compiled import (
    ACCESS_SIG,
    FIRST_COLUMN,
    KEY_SIG,
    LAYER,
    NONE,
    SIZE,
    VICTIM_SIG,
    WHERE,
    CompiledPolicy,
    Kernel,
    dequeue,
)
from harness.cache.jit import KERNEL, njit
from harness.cache.queues import move_to_newest, oldest_unmarked
from harness.cache.registry import register_policy
from harness.errors import HarnessError
from harness.keys import ExpertKey

_WRAP = 1 << 30
"""Added to `j - l` for layers at or before the current one: larger than any span of layer ids."""
USES = 0
"""Int global: the use counter; g[0:3] holds it (and two unused words), so that layer j's recency queue is queue
j + 1 (`harness.cache.queues` finds queue q's ends at g[3q:3q + 3])."""
STEP, USE = FIRST_COLUMN, FIRST_COLUMN + 1
"""Key columns: the token step of the last use, and the use counter then."""


@njit("int64(int64, int64)", **KERNEL)
def _wait(layer: int, current: int) -> int:
    """Layer visits (in id units) until `layer` is visited again, seen from the step of `current`."""
    return layer - current if layer > current else layer - current + _WRAP


@njit(KEY_SIG, **KERNEL, inline="always")
def _touch(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    """A use (a hit's access or an insert): the key's step and order of use, and the newest end of its layer's
    recency queue."""
    g[USES] += 1
    ki[key, STEP] = now
    ki[key, USE] = g[USES]
    move_to_newest(g, ki, 1 + ki[key, LAYER], key, WHERE)


@njit(ACCESS_SIG, **KERNEL, inline="always")
def _access(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int, hit: bool) -> None:
    _touch(g, gf, ki, kf, key, now)


@njit(VICTIM_SIG, **KERNEL, inline="always")
def _least_stale(
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
    """The largest (wait of the key's layer, -last use): the least recently used candidate of the first layer
    with one, in the order current layer, the one before, ... back around (decreasing wait); use orders are
    distinct, so the expert never breaks a tie."""
    current, layers = ki[incoming, LAYER], len(g) // 3 - 1
    for back in range(layers):
        layer = (current - back) % layers
        if g[3 * (1 + layer) + SIZE]:
            key = oldest_unmarked(g, ki, 1 + layer, WHERE, mark, tag)
            if key != NONE:
                return key
    return NONE


@njit(VICTIM_SIG, **KERNEL, inline="always")
def _layer_lru(
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
    """The smallest (step of last use, -wait of the key's layer, last use): of each layer's least recently used
    candidate (the smallest (step, last use) of the layer), the one of the oldest step, then of the latest next
    visit; use orders are distinct, so the expert never breaks a tie."""
    current, layers = ki[incoming, LAYER], len(g) // 3 - 1
    best, best_step, best_wait = NONE, 0, 0
    for layer in range(layers):
        if g[3 * (1 + layer) + SIZE]:
            key = oldest_unmarked(g, ki, 1 + layer, WHERE, mark, tag)
            if key != NONE:
                wait = _wait(layer, current)
                if best == NONE or ki[key, STEP] < best_step or (ki[key, STEP] == best_step and wait > best_wait):
                    best, best_step, best_wait = key, ki[key, STEP], wait
    return best


class _LayerOrdered(CompiledPolicy):
    """Recency bookkeeping shared by both: each key's last token step and order of use, and a recency queue per
    layer (queue j + 1 for layer id j: the victim is found among the queues' oldest keys, where a scan of every
    resident key took O(capacity) a miss, 2.8M accesses a second with 256 slots in one global cache)."""

    observes_misses = False
    int_columns = (-1, 0)

    def globals_(self) -> tuple[list[int], list[float]]:
        return [0, 0, 0], []

    def bind(self, keys: list[ExpertKey]) -> np.ndarray:
        """Rows of `keys`; a queue for each layer id up to the largest bound."""
        for layer, _ in keys:
            if layer < 0:  # queue 1 + layer would be the use counter's words
                raise HarnessError(f"{self.name}: negative layer id {layer}")
        rows = super().bind(keys)
        layers = len(self.g) // 3 - 1
        wanted = max((layer + 1 for layer, _ in keys), default=0)
        if wanted > layers:
            self.g = np.concatenate([self.g, np.tile(np.array([NONE, NONE, 0], np.int64), wanted - layers)])
        return rows


@register_policy
class LeastStale(_LayerOrdered):
    name = "least-stale"
    kernel = Kernel(access=_access, insert=_touch, evict=dequeue, victim=_least_stale)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "rule": "latest next layer visit first, then least recently used"}


@register_policy
class LayerLRU(_LayerOrdered):
    name = "layer-lru"
    kernel = Kernel(access=_access, insert=_touch, evict=dequeue, victim=_layer_lru)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "rule": "oldest token step first, then latest next layer visit"}
