"""LFU: evict the resident expert with the fewest accesses, ties broken by least recent use.

Two counter scopes, named in every result: `lfu` counts over the whole lifetime (counts survive
eviction, never reset); `lfu-window:W` counts only the accesses of the last W token steps.
"""

from __future__ import annotations

import numpy as np

from harness.cache.compiled import (
    ACCESS_SIG,
    EXPERT,
    FIRST_COLUMN,
    KEY_SIG,
    LAYER,
    NONE,
    VICTIM_SIG,
    CompiledPolicy,
    GroupReplay,
    Kernel,
)
from harness.cache.heaps import HeapPolicy, heap_globals, heap_put, heap_remove, heap_rerank, lowest_unmarked
from harness.cache.jit import KERNEL, njit
from harness.cache.registry import register_policy
from harness.errors import HarnessError
from harness.keys import ExpertKey

DEFAULT_WINDOW_STEPS = 128
"""Window of `lfu-window` without an argument, in token steps (a documented default, not a paper's)."""


COUNT, STAMP, PLACE = 0, 1, 2
"""LFU's key columns, from the first its owner gives it (`FIRST_COLUMN` for `lfu`): lifetime accesses, the clock
at the last touch (a hit's access or an insert), the key's place in the heap of resident keys (NONE: not
resident)."""
LFU_COLUMNS = (0, 0, NONE)
"""Their values for a key first seen."""
CLOCK, HEAP = 0, 1
"""LFU's int globals, from the first its owner gives it: the touch clock, then the heap."""


def lfu_globals(capacity: int) -> list[int]:
    """LFU's int globals for a cache of `capacity` keys."""
    return [0, *heap_globals(capacity)]


@njit(**KERNEL, inline="always")
def lfu_access(g: np.ndarray, ki: np.ndarray, at: int, col: int, key: int, hit: bool) -> None:
    """An access counts; a hit's access renews the stamp. LFU's globals from g[at], its key columns from `col`
    (as the functions below)."""
    ki[key, col + COUNT] += 1
    if hit:
        ki[key, col + STAMP] = g[at + CLOCK]
        g[at + CLOCK] += 1
        heap_rerank(g, ki, at + HEAP, key, col + PLACE, ki[key, col + COUNT], ki[key, col + STAMP], 0)


@njit(**KERNEL, inline="always")
def lfu_insert(g: np.ndarray, ki: np.ndarray, at: int, col: int, key: int) -> None:
    """An insert renews the stamp; the key joins the heap."""
    ki[key, col + STAMP] = g[at + CLOCK]
    g[at + CLOCK] += 1
    heap_put(g, ki, at + HEAP, key, col + PLACE, ki[key, col + COUNT], ki[key, col + STAMP], 0)


@njit(**KERNEL, inline="always")
def lfu_evict(g: np.ndarray, ki: np.ndarray, at: int, col: int, key: int) -> None:
    """The key leaves the heap; its count stays."""
    heap_remove(g, ki, at + HEAP, key, col + PLACE)


@njit(**KERNEL, inline="always")
def lfu_victim(g: np.ndarray, at: int, mark: np.ndarray, tag: int) -> int:
    """The resident key of lowest (count, stamp) whose mark is not `tag` (NONE: none)."""
    return lowest_unmarked(g, at + HEAP, mark, tag)


@njit(ACCESS_SIG, **KERNEL, inline="always")
def _access(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int, hit: bool) -> None:
    lfu_access(g, ki, 0, FIRST_COLUMN, key, hit)


@njit(KEY_SIG, **KERNEL, inline="always")
def _insert(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    lfu_insert(g, ki, 0, FIRST_COLUMN, key)


@njit(KEY_SIG, **KERNEL, inline="always")
def _evict(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    lfu_evict(g, ki, 0, FIRST_COLUMN, key)


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
    """The resident key of lowest (count, stamp) that the step does not need: the heap's lowest unmarked."""
    return lfu_victim(g, 0, mark, tag)


@register_policy
class LFU(HeapPolicy):
    """Lifetime counts (a miss counts too; a key placed without an access counts 0); ties go to the least
    recently touched key (a hit's access or an insert ticks a clock), in LRU's order (within one step, the hits,
    by expert id, were touched before the misses were inserted, by expert id). The resident keys are kept in a
    min-heap of (count, stamp) (`harness.cache.heaps`): a touch, an insert and an eviction cost O(log capacity),
    and the victim is found at the top, where a scan of every resident key took O(capacity) a miss (2.8M
    accesses a second with 256 slots in one global cache)."""

    name = "lfu"
    kernel = Kernel(access=_access, insert=_insert, evict=_evict, victim=_victim)
    int_columns = LFU_COLUMNS
    heap_at = HEAP

    def globals_(self) -> tuple[list[int], list[float]]:
        return lfu_globals(self.capacity), []

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "counts": "lifetime", "window_steps": None, "ties": "least recently used"}


WINDOW, HEAD, SIZE, OVERFLOW, RING = 0, 1, 2, 3, 4
"""`lfu-window`'s int globals: the window, the ring of the window's accesses (the oldest's position, how many
it holds; 1 where an access found it full), then the ring: its token steps, then its keys."""
WINDOW_COUNT, LAST = FIRST_COLUMN, FIRST_COLUMN + 1
"""Key columns: accesses in the window, the last access (-1: none)."""


@njit(ACCESS_SIG, **KERNEL)
def _windowed_access(
    g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int, hit: bool
) -> None:
    ring = (len(g) - RING) // 2
    horizon = now - g[WINDOW]
    while g[SIZE] and g[RING + g[HEAD]] <= horizon:  # the accesses that leave the window
        ki[g[RING + ring + g[HEAD]], WINDOW_COUNT] -= 1
        g[HEAD] = (g[HEAD] + 1) % ring
        g[SIZE] -= 1
    if g[SIZE] == ring:
        g[OVERFLOW] = 1
        return
    ki[key, WINDOW_COUNT] += 1
    ki[key, LAST] = now
    at = (g[HEAD] + g[SIZE]) % ring
    g[RING + at], g[RING + ring + at] = now, key
    g[SIZE] += 1


@njit(VICTIM_SIG, **KERNEL)
def _windowed_victim(
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
    """The smallest (count, last access, key); a key placed without an access (an engine's static placement)
    counts 0, last used never."""
    best, best_rank = -1, (0, 0, 0, 0)
    for key in resident:
        if key >= 0 and mark[key] != tag:
            rank = (ki[key, WINDOW_COUNT], ki[key, LAST], ki[key, LAYER], ki[key, EXPERT])
            if best < 0 or rank < best_rank:
                best, best_rank = key, rank
    return best


@register_policy
class WindowedLFU(CompiledPolicy):
    """Counts of the last `window` token steps; an access leaves the count `window` steps after it. The window's
    accesses wait in a ring of (window + 1) x keys entries: a key is accessed at most once per token step."""

    name = "lfu-window"
    kernel = Kernel(access=_windowed_access, victim=_windowed_victim)
    int_columns = (0, -1)

    def __init__(self, capacity: int, seed: int = 0, window: int = DEFAULT_WINDOW_STEPS) -> None:
        self.window = window
        super().__init__(capacity, seed)

    def globals_(self) -> tuple[np.ndarray | list[int], list[float]]:
        return [self.window, 0, 0, 0], []

    def bind(self, keys: list[ExpertKey]) -> np.ndarray:
        rows = super().bind(keys)
        ring = (len(self.g) - RING) // 2
        wanted = (self.window + 1) * self.slots
        if wanted > ring:  # unroll the ring, oldest first, into a larger one
            order = (self.g[HEAD] + np.arange(self.g[SIZE])) % ring
            steps, held = np.zeros(wanted, np.int64), np.zeros(wanted, np.int64)
            steps[: len(order)], held[: len(order)] = self.g[RING + order], self.g[RING + ring + order]
            self.g = np.concatenate([self.g[:RING], steps, held])
            self.g[HEAD] = 0
        return rows

    def _check(self) -> None:
        if self.g[OVERFLOW]:
            raise HarnessError(f"{self.name}: a key was accessed twice in one token step (its window ring is full)")

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        super().on_access(key, now, hit)
        self._check()

    def replay(self, r: GroupReplay, start: int) -> int:
        done = super().replay(r, start)
        self._check()
        return done

    @classmethod
    def from_spec(cls, capacity: int, seed: int, argument: str | None, **_: object) -> WindowedLFU:
        try:
            window = DEFAULT_WINDOW_STEPS if argument is None else int(argument)
        except ValueError:
            raise HarnessError(
                f"lfu-window takes a window in token steps, e.g. lfu-window:128 (got {argument!r})"
            ) from None
        if window < 1:
            raise HarnessError(f"lfu-window needs a window of at least 1 step (got {window})")
        return cls(capacity, seed, window)

    def reset(self) -> None:
        self.__init__(self.capacity, self.seed, self.window)  # type: ignore[misc]

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "counts": "window", "window_steps": self.window}
