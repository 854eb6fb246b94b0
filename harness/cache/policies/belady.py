"""Belady MIN, the offline optimum: evict the resident expert whose next use is farthest (never = infinity).

Simulation only: it reads the future. The simulator hands it a `FutureAccesses` (every key's access
times, in replay order) through the registry's context; without one, construction is refused, and
`needs_future` lets the live engine refuse it up front. Two variants: `belady` (forced admission:
every miss is inserted) and `belady-bypass` (a miss whose next use is farther than every candidate's
is not inserted; it streams through a scratch slot).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from harness.cache.compiled import (
    ACCESS_SIG,
    ADMIT_SIG,
    EXPERT,
    FIRST_COLUMN,
    LAYER,
    NONE,
    VICTIM_SIG,
    CompiledAdmission,
    CompiledPolicy,
    GroupReplay,
    Kernel,
)
from harness.cache.jit import KERNEL, njit
from harness.cache.registry import register_policy
from harness.errors import HarnessError
from harness.keys import ExpertKey

NEVER = 2**62
"""Next-use time of a key that is not accessed again."""
ERROR, ERROR_KEY, ERROR_NOW = 0, 1, 2
"""Int globals: an access not in the future was seen (1), its key and step; every known key's access times
follow."""
AT, END, NEXT = FIRST_COLUMN, FIRST_COLUMN + 1, FIRST_COLUMN + 2
"""Key columns: the key's next unconsumed access time and the end of its times (positions in the globals), its
next use."""


class FutureAccesses:
    """Every key's access times (the `now` of each step that needs it), ascending, for one replay: `times`, or
    the same as arrays (`arrays`: every key's times end to end, and each key's (start, end) in them), each
    built from the other when first asked for."""

    def __init__(self, times: Mapping[ExpertKey, list[int]]) -> None:
        self._times: dict[ExpertKey, list[int]] | None = dict(times)
        self._arrays: tuple[np.ndarray, dict[ExpertKey, tuple[int, int]]] | None = None

    @classmethod
    def of_arrays(cls, keys: Sequence[ExpertKey], starts: np.ndarray, flat: np.ndarray) -> FutureAccesses:
        """From `flat` and each of `keys`' start in it (ascending; a key's times end where the next one's start)."""
        future = cls({})
        ends = [*starts[1:].tolist(), len(flat)]
        future._times = None
        future._arrays = flat, dict(zip(keys, zip(starts.tolist(), ends, strict=True), strict=True))
        return future

    @property
    def times(self) -> dict[ExpertKey, list[int]]:
        if self._times is None:
            flat, spans = self.arrays()
            self._times = {key: flat[a:b].tolist() for key, (a, b) in spans.items()}
        return self._times

    def arrays(self) -> tuple[np.ndarray, dict[ExpertKey, tuple[int, int]]]:
        if self._arrays is None:
            spans, at = {}, 0
            for key, times in self.times.items():
                spans[key] = (at, at + len(times))
                at += len(times)
            flat = np.fromiter((t for times in self.times.values() for t in times), dtype=np.int64, count=at)
            self._arrays = flat, spans
        return self._arrays


@njit(ACCESS_SIG, **KERNEL)
def _access(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int, hit: bool) -> None:
    i = ki[key, AT]
    if i >= ki[key, END] or g[i] != now:
        g[ERROR], g[ERROR_KEY], g[ERROR_NOW] = 1, key, now
        return
    ki[key, AT] = i + 1
    ki[key, NEXT] = g[i + 1] if i + 1 < ki[key, END] else NEVER


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
    """The candidate of the largest (next use, key): ties (several never used again) go to the largest key, so
    the choice is the same on every run."""
    # Selects, not branches: which key ranks lower is a coin toss that the branch predictor loses.
    best, best_next, best_layer, best_expert = -1, -1, -1, -1
    for key in resident:
        usable = key >= 0 and mark[key] != tag
        n, layer, expert = ki[key, NEXT], ki[key, LAYER], ki[key, EXPERT]
        higher = usable & (
            (best < 0)
            | (n > best_next)
            | ((n == best_next) & ((layer > best_layer) | ((layer == best_layer) & (expert > best_expert))))
        )
        best = key if higher else best
        best_next = n if higher else best_next
        best_layer = layer if higher else best_layer
        best_expert = expert if higher else best_expert
    return best


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
    farthest = _victim(g, gf, ki, kf, resident, mark, tag, incoming, now)
    return farthest if ki[incoming, NEXT] < ki[farthest, NEXT] else NONE


@register_policy
class Belady(CompiledPolicy):
    name = "belady"
    needs_future = True
    kernel = Kernel(access=_access, victim=_victim)
    int_columns = (0, 0, NEVER)

    def __init__(self, capacity: int, seed: int = 0, future: FutureAccesses | None = None) -> None:
        if future is None:
            raise HarnessError(
                f"{self.name} reads the future of a trace: it runs only in `harness simulate`, not in a live run"
            )
        self.future = future
        super().__init__(capacity, seed)

    def globals_(self) -> tuple[np.ndarray | list[int], list[float]]:
        return [0, -1, 0], []

    def new_rows(self, keys: list[ExpertKey]) -> tuple[np.ndarray, np.ndarray]:
        """Also appends the keys' access times to the globals: a policy holds the times of its own keys only
        (in per-layer scope, its layer's)."""
        ki, kf = super().new_rows(keys)
        flat, spans = self.future.arrays()
        pieces, at = [], len(self.g)
        for row, key in enumerate(keys):
            start, end = spans.get(key, (0, 0))  # a key without a future: no times, its first access is refused
            ki[row, AT], ki[row, END] = at, at + end - start
            pieces.append(flat[start:end])
            at += end - start
        self.g = np.concatenate([self.g, *pieces])
        return ki, kf

    @classmethod
    def from_spec(
        cls, capacity: int, seed: int, argument: str | None, future: FutureAccesses | None = None, **_: object
    ) -> Belady:
        if argument is not None:
            raise HarnessError(f"policy {cls.name!r} takes no argument (got {argument!r})")
        return cls(capacity, seed, future)

    def _check(self) -> None:
        if self.g[ERROR]:
            key, now = self.keys[int(self.g[ERROR_KEY])], int(self.g[ERROR_NOW])
            raise HarnessError(f"{self.name}: access to {key} at step {now} is not in the future it was given")

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        super().on_access(key, now, hit)
        self._check()

    def replay(self, r: GroupReplay, start: int) -> int:
        done = super().replay(r, start)
        self._check()
        return done

    def reset(self) -> None:
        self.__init__(self.capacity, self.seed, self.future)  # type: ignore[misc]


@register_policy
class BeladyBypass(CompiledAdmission, Belady):
    name = "belady-bypass"
    kernel = Kernel(access=_access, victim=_victim, admit=_admit)
