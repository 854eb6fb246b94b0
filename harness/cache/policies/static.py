"""Static placement: a fixed set of the most frequent experts, never replaced.

- `static-oracle`: the C most frequent experts of the very stream being replayed (C = the group's
  capacity): the best any fixed set can do, a bound practitioners print beside LRU. It reads the future,
  so it is simulation only (like Belady).
- `static` / `static:PROFILE`: the C most frequent experts of a frequency profile: PROFILE is a trace
  file (its accesses, all phases, are counted), or, under `harness simulate --split`, the training part.
  Allowed live: it needs nothing from the future of the run.

One rule serves both, inside the shared cache loop: experts are ranked by their count (ties by key) and
unknown ones come last. A miss is admitted only when it ranks above the lowest-ranked candidate, which it
then replaces; otherwise it streams through a scratch slot. In per-layer scope a layer's group thus holds
its layer's top C, in global scope the top C of all layers. The cache starts empty like every other
policy's, so each pinned expert's first use is a miss (free slots take whatever comes first and lose it to
the pinned experts as they arrive).
"""

from __future__ import annotations

import functools
from collections.abc import Set
from pathlib import Path

from harness.cache.base import CachePolicy
from harness.cache.policies.belady import FutureAccesses
from harness.cache.profile import FrequencyProfile
from harness.cache.registry import register_policy
from harness.errors import HarnessError
from harness.keys import ExpertKey


class _StaticRanked(CachePolicy):
    observes_misses = False

    def __init__(self, capacity: int, seed: int = 0, ranking: dict[ExpertKey, int] | None = None) -> None:
        super().__init__(capacity, seed)
        self.ranking = ranking or {}
        self._unknown = len(self.ranking)

    def _rank(self, key: ExpertKey) -> tuple[int, ExpertKey]:
        return self.ranking.get(key, self._unknown), key

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        pass

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        return max(candidates, key=self._rank)

    def admit(self, incoming: ExpertKey, candidates: Set[ExpertKey], now: int) -> bool:
        return self._rank(incoming) < max(map(self._rank, candidates))

    def reset(self) -> None:
        self.__init__(self.capacity, self.seed, self.ranking)  # type: ignore[misc]


@register_policy
class StaticOracle(_StaticRanked):
    name = "static-oracle"
    needs_future = True

    @classmethod
    def from_spec(
        cls, capacity: int, seed: int, argument: str | None, future: FutureAccesses | None = None, **_: object
    ) -> StaticOracle:
        if argument is not None:
            raise HarnessError(f"policy {cls.name!r} takes no argument (got {argument!r})")
        if future is None:
            raise HarnessError(
                f"{cls.name} reads the future of a trace: it runs only in `harness simulate`, not in a live run"
            )
        counts = {key: len(times) for key, times in future.times.items()}
        return cls(capacity, seed, FrequencyProfile(counts).ranking())

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "set": "most frequent of the replayed stream (reads the future)"}


@register_policy
class StaticProfile(_StaticRanked):
    name = "static"
    profiled = True

    def __init__(
        self, capacity: int, seed: int = 0, ranking: dict[ExpertKey, int] | None = None, source: str = ""
    ) -> None:
        super().__init__(capacity, seed, ranking)
        self.source = source

    @classmethod
    def from_spec(
        cls, capacity: int, seed: int, argument: str | None, profile: FrequencyProfile | None = None, **_: object
    ) -> StaticProfile:
        profile = load_profile(cls.name, argument, profile)
        return cls(capacity, seed, profile.ranking(), profile.source)

    def reset(self) -> None:
        self.__init__(self.capacity, self.seed, self.ranking, self.source)  # type: ignore[misc]

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "set": "most frequent of a profile", "profile": self.source}


def load_profile(name: str, argument: str | None, profile: FrequencyProfile | None) -> FrequencyProfile:
    """The profile of `name:PATH` (a trace file), else the one the simulator passed (`--split`)."""
    if argument:
        path = Path(argument).expanduser().resolve()
        if not path.is_file():
            raise HarnessError(f"{name}: profile trace {argument} does not exist")
        return _trace_profile(str(path), path.stat().st_mtime_ns)
    if profile is None:
        raise HarnessError(
            f"{name} needs a frequency profile: {name}:TRACE (a trace file), or `harness simulate --split ...` "
            "(profiled on the training part)"
        )
    return profile


@functools.lru_cache(maxsize=4)
def _trace_profile(path: str, mtime_ns: int) -> FrequencyProfile:
    # Keyed by modification time too; per-layer scope builds one policy per layer from the same file.
    # Imported here: the trace package replays through this one, so it cannot be imported at load time.
    from harness.trace.simulate import trace_profile

    return trace_profile(path)
