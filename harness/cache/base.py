"""The CachePolicy interface: pure bookkeeping over expert keys, shared by the live engine and the simulator.

A policy observes accesses and names victims; it never touches bytes and does no I/O. The loop that
calls it ("find, else evict until it fits, then insert") is written once, in `harness.cache.book`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence, Set
from typing import ClassVar

from harness.keys import ExpertKey


class CachePolicy(ABC):
    """Decides which resident expert leaves the cache.

    Call order within one token step of one layer (the `ExpertCacheBook` guarantees it):
    0. `on_step(layer, now)`, if the policy overrides it;
    1. `on_access(key, now, hit)` for every distinct key the step needs, hits and misses alike (misses
       only where `observes_misses`), before any miss is handled, so a step never evicts an expert it
       still needs (mixtral-offloading rule);
    2. for each miss: with a free slot, `on_insert(key)`; with a full cache, `admit` (if overridden),
       then `replace`, which by default is `victim` among the candidates (resident keys that the step
       does not need), `on_evict(victim)`, `on_insert(key)`.
    Trace replay, once the cache is full, makes the same calls a step at a time through `replay_step`
    (no plan, every miss admitted); by default it loops over the hooks above.
    An engine may also call `victim`/`on_evict` (prefetch, dropping a key) and `on_insert` (placement)
    between steps; policies must accept that.

    `now` is the logical clock: the index of the token step (forward pass), monotonically increasing.
    """

    name: ClassVar[str]
    needs_future: ClassVar[bool] = False
    """True for oracles (Belady) that read the trace's future: simulation only, refused by the engine."""
    observes_misses: ClassVar[bool] = True
    """False where `on_access` ignores misses (LRU): the cache loop then skips the call for them."""
    profiled: ClassVar[bool] = False
    """True where the policy learns from a training part (a frequency profile): `harness simulate --split`
    hands it the training part and reports it on held-out data only."""
    exact: ClassVar[bool] = True
    """False where the policy changes what the model computes (none of the eviction policies do)."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.seed = seed

    def on_step(self, layer: int, now: int) -> None:  # noqa: B027 - optional hook
        """A token step of `layer` begins (called only where a policy overrides it)."""

    @abstractmethod
    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        """Record one access (de-duplicated within the token step)."""

    @abstractmethod
    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        """Name the resident key to evict; `candidates` is non-empty and excludes the step's own keys."""

    def admit(self, incoming: ExpertKey, candidates: Set[ExpertKey], now: int) -> bool:
        """Whether a miss is inserted at all (False: it is streamed through a scratch slot)."""
        return True

    def on_insert(self, key: ExpertKey, now: int) -> None:  # noqa: B027 - optional hook
        """`key` became resident."""

    def on_evict(self, key: ExpertKey, now: int) -> None:  # noqa: B027 - optional hook
        """`key` left the cache."""

    def replace(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        """`victim`, `on_evict(victim)`, `on_insert(incoming)` in one call; returns the victim.

        The shared loop calls this for each admitted miss when the cache is full. A policy may override
        it with a fused version to save calls on the replay hot path; it must decide exactly as the
        three hooks do (tests compare both).
        """
        victim = self.victim(candidates, incoming, now)
        self.on_evict(victim, now)
        self.on_insert(incoming, now)
        return victim

    def replay_step(
        self, layer: int, keys: Sequence[ExpertKey], resident: Mapping[ExpertKey, int], now: int
    ) -> tuple[list[ExpertKey], list[ExpertKey]]:
        """One token step of `layer` in trace replay: the misses among `keys`, in order, and a victim for each
        of them, in order.

        Called once the group is full (no free slot, nothing staged, every miss admitted) and has room for
        the whole step (`len(resident) >= len(keys)`, so there are at least as many candidates, the
        `resident` keys not in `keys`, as misses). It makes the calls of steps 0.-2. above: `on_step`,
        `on_access` for each key (`key in resident` tells a hit), then `replace` for each miss, each victim
        leaving the candidates. `resident` does not change during the call (the caller moves the slots
        afterwards). A policy may override it to save calls on the replay hot path; it must decide exactly
        as this loop does (tests compare both).
        """
        self.on_step(layer, now)
        on_access, observes_misses = self.on_access, self.observes_misses
        misses = []
        for key in keys:
            if key in resident:
                on_access(key, now, True)
            else:
                misses.append(key)
                if observes_misses:
                    on_access(key, now, False)
        if not misses:
            return misses, []
        candidates = resident.keys() - set(keys)
        victims = []
        for key in misses:
            victim = self.replace(candidates, key, now)
            candidates.discard(victim)
            victims.append(victim)
        return misses, victims

    def reset(self) -> None:
        """Forget all state (a new, empty cache), keeping capacity and seed."""
        self.__init__(self.capacity, self.seed)  # type: ignore[misc]

    def describe(self) -> dict[str, object]:
        """Name and parameters, recorded in every result that uses the policy."""
        return {"name": self.name}
