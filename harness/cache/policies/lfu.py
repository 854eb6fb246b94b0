"""LFU: evict the resident expert with the fewest accesses, ties broken by least recent use.

Two counter scopes, named in every result: `lfu` counts over the whole lifetime (counts survive
eviction, never reset); `lfu-window:W` counts only the accesses of the last W token steps.
"""

from __future__ import annotations

from bisect import bisect_left

# _count_elements is the C loop behind Counter.update (collections falls back to a Python one without
# it); called directly it skips Counter.update's Python-level argument checks, about a tenth of LFU's
# replay time.
from collections import Counter, _count_elements, deque
from collections.abc import Mapping, Sequence, Set

from harness.cache.base import CachePolicy
from harness.cache.registry import register_policy
from harness.errors import HarnessError
from harness.keys import ExpertKey

DEFAULT_WINDOW_STEPS = 128
"""Window of `lfu-window` without an argument, in token steps (a documented default, not a paper's)."""

LOW_SIZE = 4
"""Keys LFU's low tier keeps when the ranking is re-split: small, since every replay step re-sorts it."""
LOW_SLACK = 4
"""How far the low tier may outgrow its size at the last re-split (keys placed into free slots or by an
engine; a replay step never grows it) before the ranking is re-split."""
_NO_FLOOR = 1 << 62  # a floor no count reaches: every placed key belongs to the low tier


@register_policy
class LFU(CachePolicy):
    """Lifetime counts; ties go to the least recently used key, in LRU's order (within one step, the hits,
    by expert id, were touched before the misses were inserted, by expert id).

    Placed keys are ranked by (count, placement), where a key's placement is renewed each time it takes
    its place in the order; the victim is the lowest. The ranking is kept in two tiers split by a count
    floor, so that the work of a step grows with the keys it touches rather than with the capacity:
    - `_low`: the keys whose count is below `_floor`, as a list in rank order. Victims are taken from its
      front; a step's placed keys are appended and the list re-sorted by count (a stable sort, so equal
      counts stay in placement order).
    - `_top`: the keys at or above the floor, each with its placement number, so that a hit, mostly on a
      popular expert, is one dict store instead of a list scan. The tier is ranked only when the low tier
      runs short of victims: `_split` then moves its lowest keys down and raises the floor (it also moves
      the upper part of an overgrown low tier up).
    Counts only grow, so no top key falls below the floor: every low key ranks below every top key.

    The keys of the step being handled are held back in `_pending` (they can never be victims of their
    own step) and take their places, in the order they were touched, when the step ends, the next one
    starts (`on_step`), or earlier where `victim` is called from outside the loop's fused `replace` (an
    engine's prefetch between steps, LeCaR). A hit on a top key takes its place at once when nothing is
    pending: it would have been placed first anyway.
    """

    name = "lfu"

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, seed)
        self._count: Counter[ExpertKey] = Counter()  # missing keys count 0 (placed without an access)
        self._count_of = self._count.__getitem__  # the sort key, bound once
        self._low: list[ExpertKey] = []
        self._top: dict[ExpertKey, int] = {}  # key -> placement number (larger: placed later)
        self._next = 0  # the next placement number
        self._floor = _NO_FLOOR
        self._low_limit = LOW_SIZE + LOW_SLACK
        self._pending: list[ExpertKey] = []  # touched by the current step, in touch order

    def _ranked_top(self) -> list[ExpertKey]:
        top = self._top
        keys = sorted(top, key=top.__getitem__)
        keys.sort(key=self._count_of)  # stable: equal counts stay in placement order
        return keys

    def _lift(self, i: int) -> None:
        """Move the low tier's keys from index `i` on to the top tier, placed in their order."""
        low, top, n = self._low, self._top, self._next
        for key in low[i:]:
            top[key] = n
            n += 1
        self._next = n
        del low[i:]

    def _place(self) -> None:
        """Give the pending keys their places, in order."""
        low = self._low
        low += self._pending
        self._pending.clear()
        count = self._count_of
        low.sort(key=count)
        if count(low[-1]) >= self._floor:  # the placed keys at or above the floor join the top tier
            self._lift(bisect_left(low, self._floor, key=count))
        if len(low) > self._low_limit:
            self._split(LOW_SIZE)

    def _split(self, size: int) -> None:
        """Re-split the ranking so that the low tier holds more than `size` keys (or all of them)."""
        low = self._low
        low += self._ranked_top()  # every top key ranks above every low key
        self._top.clear()
        self._floor = _NO_FLOOR
        if size < len(low):
            count = self._count_of
            floor = count(low[size]) + 1  # the floor falls between counts: all keys of one count stay together
            i = bisect_left(low, floor, key=count)
            if i < len(low):
                self._lift(i)
                self._floor = floor
        # Keys of one count cannot be split: wait until the low tier has grown before trying again.
        self._low_limit = max(len(low), size) + LOW_SLACK

    def on_step(self, layer: int, now: int) -> None:
        if self._pending:
            self._place()

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        self._count[key] += 1
        if hit:
            top = self._top
            if key in top:
                if self._pending:  # e.g. a prefetched key inserted earlier in the step: place after it
                    del top[key]
                    self._pending.append(key)
                else:
                    top[key] = self._next
                    self._next += 1
            else:
                self._low.remove(key)
                self._pending.append(key)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self._pending.append(key)

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        # Outside the loop's fused path the last step's keys may be candidates: place them first.
        # Placing keys early never changes the order, only the scan length.
        if self._pending:
            self._place()
        for key in self._low:
            if key in candidates:
                return key
        for key in self._ranked_top():
            if key in candidates:
                return key
        raise AssertionError("victim() called without a resident candidate")

    def on_evict(self, key: ExpertKey, now: int) -> None:
        if key in self._top:
            del self._top[key]
        elif key in self._low:
            self._low.remove(key)
        else:
            self._pending.remove(key)  # dropped by its own step's caller (e.g. an engine discarding it)

    def replace(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        # victim + on_evict + on_insert fused (the loop's path for each miss). The step's keys are pending,
        # in the top tier or not resident, so the front of the low tier is a candidate unless `victim`
        # placed them early (LeCaR, prefetch); then the scan decides.
        low = self._low
        if not low:
            self._split(LOW_SIZE)
        if low and low[0] in candidates:
            key = low.pop(0)
        else:
            key = self.victim(candidates, incoming, now)
            self.on_evict(key, now)
        self._pending.append(incoming)
        return key

    def replay_step(
        self, layer: int, keys: Sequence[ExpertKey], resident: Mapping[ExpertKey, int], now: int
    ) -> tuple[list[ExpertKey], list[ExpertKey]]:
        # The per-key hooks' moves without a call per key: on_step, on_access for each key, replace for
        # each miss, and the placing of the step's keys at its end.
        if self._pending:
            self._place()
        low, top = self._low, self._top
        _count_elements(self._count, keys)
        placed = []  # the step's low hits, to be placed with its misses
        misses = []
        n = self._next
        for key in keys:
            if key in resident:
                if key in top:
                    # Placed at once, before the step's earlier low hits: their counts stay at or below
                    # the floor and this one's goes above it, so their order never matters.
                    top[key] = n
                    n += 1
                else:
                    low.remove(key)
                    placed.append(key)
            else:
                misses.append(key)
        self._next = n
        m = len(misses)
        if not m:
            self._pending += placed  # placed when the next step starts
            return misses, []
        # The step's low hits are out of the ranking and its top hits rank above the low tier, so the
        # victims are the front of the low tier, unless it is too short.
        if len(low) < m:
            self._split(LOW_SIZE + len(keys))
            victims = [key for key in low if key not in keys][:m]
            for key in victims:
                low.remove(key)
        else:
            victims = low[:m]
            del low[:m]
        # _place, inlined. The low tier cannot grow here: it gets back at most the keys it just lost.
        low += placed
        low += misses
        count = self._count_of
        low.sort(key=count)
        # While the top tier is empty the floor has nothing to keep apart (and no key can join the tier
        # here), so the look-up is skipped; `_place` lifts any key at or above it.
        if top and count(low[-1]) >= self._floor:
            self._lift(bisect_left(low, self._floor, key=count))
        return misses, victims

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "counts": "lifetime", "window_steps": None, "ties": "least recently used"}


@register_policy
class WindowedLFU(CachePolicy):
    """Counts of the last `window` token steps; an access leaves the count `window` steps after it."""

    name = "lfu-window"

    def __init__(self, capacity: int, seed: int = 0, window: int = DEFAULT_WINDOW_STEPS) -> None:
        super().__init__(capacity, seed)
        self.window = window
        self._count: dict[ExpertKey, int] = {}
        self._last: dict[ExpertKey, int] = {}
        self._recent: deque[tuple[int, ExpertKey]] = deque()  # (step, key) of the accesses in the window

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

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        self._last[key] = now
        self._recent.append((now, key))
        horizon = now - self.window
        while self._recent[0][0] <= horizon:
            _, old = self._recent.popleft()
            self._count[old] -= 1

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        count, last = self._count, self._last
        # A key placed without an access (an engine's static placement) counts 0, last used never.
        return min(candidates, key=lambda k: (count.get(k, 0), last.get(k, -1), k))

    def reset(self) -> None:
        self.__init__(self.capacity, self.seed, self.window)  # type: ignore[misc]

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "counts": "window", "window_steps": self.window}
