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

from collections.abc import Set

from harness.cache.base import CachePolicy
from harness.cache.registry import register_policy
from harness.keys import ExpertKey

_WRAP = 1 << 30
"""Added to `j - l` for layers at or before the current one: larger than any span of layer ids."""


def _wait(layer: int, current: int) -> int:
    """Layer visits (in id units) until `layer` is visited again, seen from the step of `current`."""
    return layer - current if layer > current else layer - current + _WRAP


class _LayerOrdered(CachePolicy):
    """Recency bookkeeping shared by both: each key's last token step and its order of use."""

    observes_misses = False

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, seed)
        self._last: dict[ExpertKey, tuple[int, int]] = {}  # key -> (token step, use counter)
        self._uses = 0

    def _touch(self, key: ExpertKey, now: int) -> None:
        self._uses += 1
        self._last[key] = (now, self._uses)

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        self._touch(key, now)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self._touch(key, now)

    def on_evict(self, key: ExpertKey, now: int) -> None:
        del self._last[key]


@register_policy
class LeastStale(_LayerOrdered):
    name = "least-stale"

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        last, current = self._last, incoming[0]
        return max(candidates, key=lambda k: (_wait(k[0], current), -last[k][1], -k[1]))

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "rule": "latest next layer visit first, then least recently used"}


@register_policy
class LayerLRU(_LayerOrdered):
    name = "layer-lru"

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        last, current = self._last, incoming[0]
        return min(candidates, key=lambda k: (last[k][0], -_wait(k[0], current), last[k][1], k[1]))

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "rule": "oldest token step first, then latest next layer visit"}
