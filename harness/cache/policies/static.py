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
from pathlib import Path

import numpy as np

from harness.cache.compiled import ADMIT_SIG, EXPERT, FIRST_COLUMN, LAYER, NONE, VICTIM_SIG, CompiledAdmission, Kernel
from harness.cache.jit import KERNEL, njit
from harness.cache.policies.belady import FutureAccesses
from harness.cache.profile import FrequencyProfile
from harness.cache.registry import register_policy
from harness.errors import HarnessError
from harness.keys import ExpertKey

RANK = FIRST_COLUMN
"""Key column: the rank in the profile (0 the most frequent; unknown keys: after every known one)."""


@njit(**KERNEL)
def _rank(ki: np.ndarray, key: int) -> tuple[int, int, int]:
    """(rank in the profile, key): the larger leaves first."""
    return ki[key, RANK], ki[key, LAYER], ki[key, EXPERT]


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
    """The candidate of the largest (rank, key)."""
    worst, worst_rank = -1, (0, 0, 0)
    for key in resident:
        if key >= 0 and mark[key] != tag and (worst < 0 or _rank(ki, key) > worst_rank):
            worst, worst_rank = key, _rank(ki, key)
    return worst


@njit(ADMIT_SIG, **KERNEL)
def _admit(
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
    victim = _victim(g, gf, ki, kf, resident, mark, tag, incoming, now)
    return victim if _rank(ki, incoming) < _rank(ki, victim) else NONE


class _StaticRanked(CompiledAdmission):
    observes_misses = False
    kernel = Kernel(victim=_victim, admit=_admit)
    int_columns = (0,)

    def __init__(self, capacity: int, seed: int = 0, ranking: dict[ExpertKey, int] | None = None) -> None:
        self.ranking = ranking or {}
        self._unknown = len(self.ranking)
        super().__init__(capacity, seed)

    def new_rows(self, keys: list[ExpertKey]) -> tuple[np.ndarray, np.ndarray]:
        ki, kf = super().new_rows(keys)
        ki[:, RANK] = [self.ranking.get(key, self._unknown) for key in keys]
        return ki, kf

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
        counts = {key: end - start for key, (start, end) in future.arrays()[1].items()}
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
