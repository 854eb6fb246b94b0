"""Belady MIN, the offline optimum: evict the resident expert whose next use is farthest (never = infinity).

Simulation only: it reads the future. The simulator hands it a `FutureAccesses` (every key's access
times, in replay order) through the registry's context; without one, construction is refused, and
`needs_future` lets the live engine refuse it up front. Two variants: `belady` (forced admission:
every miss is inserted) and `belady-bypass` (a miss whose next use is farther than every candidate's
is not inserted; it streams through a scratch slot).
"""

from __future__ import annotations

from collections.abc import Mapping, Set

from harness.cache.base import CachePolicy
from harness.cache.registry import register_policy
from harness.errors import HarnessError
from harness.keys import ExpertKey

NEVER = float("inf")
"""Next-use time of a key that is not accessed again."""


class FutureAccesses:
    """Every key's access times (the `now` of each step that needs it), ascending, for one replay."""

    def __init__(self, times: Mapping[ExpertKey, list[int]]) -> None:
        self.times = dict(times)


@register_policy
class Belady(CachePolicy):
    name = "belady"
    needs_future = True

    def __init__(self, capacity: int, seed: int = 0, future: FutureAccesses | None = None) -> None:
        super().__init__(capacity, seed)
        if future is None:
            raise HarnessError(
                f"{self.name} reads the future of a trace: it runs only in `harness simulate`, not in a live run"
            )
        self.future = future
        self._seen: dict[ExpertKey, int] = {}  # accesses consumed per key, i.e. index into its times
        self._next: dict[ExpertKey, float] = {}

    @classmethod
    def from_spec(
        cls, capacity: int, seed: int, argument: str | None, future: FutureAccesses | None = None, **_: object
    ) -> Belady:
        if argument is not None:
            raise HarnessError(f"policy {cls.name!r} takes no argument (got {argument!r})")
        return cls(capacity, seed, future)

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        times = self.future.times.get(key)
        i = self._seen.get(key, 0)
        if times is None or i >= len(times) or times[i] != now:
            raise HarnessError(f"{self.name}: access to {key} at step {now} is not in the future it was given")
        self._seen[key] = i + 1
        self._next[key] = times[i + 1] if i + 1 < len(times) else NEVER

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        nxt = self._next
        # Ties (several never used again) go to the largest key, so the choice is the same on every run.
        return max(candidates, key=lambda k: (nxt[k], k))

    def reset(self) -> None:
        self.__init__(self.capacity, self.seed, self.future)  # type: ignore[misc]


@register_policy
class BeladyBypass(Belady):
    name = "belady-bypass"

    def admit(self, incoming: ExpertKey, candidates: Set[ExpertKey], now: int) -> bool:
        nxt = self._next
        return nxt[incoming] < max(nxt[k] for k in candidates)
