"""Policies whose decisions are compiled kernels over numpy arrays, run alike live and in trace replay.

A `CompiledPolicy` keeps all its state in four arrays: `g` (int64 globals: queue ends, clocks, parameters),
`gf` (float64 globals), `ki` (int64, one row per key it has seen) and `kf` (float64, one row per key). Its
decisions are five jitted functions over them, its `Kernel`: `access` (a hit, or a miss where the policy
observes misses), `insert`, `evict`, `victim` and `admit`. The policy's per-key hooks (`on_access`, ...,
what the live engine calls) call those functions for one key; `drive`, the compiled replay of a whole
stream of one cache group's steps, calls the very same functions: each policy class compiles its own copy of
`drive` whose globals name its kernel's functions (`driver`), so that the calls are direct. One implementation
of each policy, whichever path runs it; `drive` is the one simulator loop.

`admit` returns the key the miss would replace (the policy's victim) where the miss goes in, or NONE where it
streams: a policy's admission compares the miss with its victim, which `drive` then need not look for again.

Candidates: `victim` and `admit` see `resident` (key positions, -1 for none) and a `mark` array; a key is a
candidate where its mark is not `tag`. `drive` passes the group's slots and marks the step's own keys; a
hook call passes the candidates themselves, with every other key marked. Scan policies read `resident`;
queue policies walk their own queues and test the mark.

Key rows: columns LAYER and EXPERT (ties go to the smaller (layer, expert), never to the row order, which
is the order keys were first seen), then the links of doubly linked queues (`WHERE`, `OLDER`, `NEWER`: which
queue, the older and the newer neighbour; queue q's ends and size are g[3q:3q+3]), then the policy's own
columns from `FIRST_COLUMN` (more queue links where a key can be in several queues at once).

numba (`harness.cache.jit`: why numba, where its cache lives): explicit signatures, compiled when the module is
imported (a policy class's `drive` when it first replays), cached on disk, so that no compilation pause falls
inside a measured run; without numba the same functions run as plain Python.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Iterator, Set
from contextlib import contextmanager
from dataclasses import dataclass
from types import FunctionType
from typing import Any, ClassVar, NamedTuple

import numpy as np

from harness.cache.base import CachePolicy
from harness.cache.jit import KERNEL, njit
from harness.cache.queues import NEWER_LINK, OLDER_LINK, leave
from harness.cache.queues import NEWEST as NEWEST
from harness.cache.queues import NONE as NONE
from harness.cache.queues import OLDEST as OLDEST
from harness.cache.queues import SIZE as SIZE
from harness.cache.queues import push as push
from harness.cache.queues import unlink as unlink
from harness.keys import ExpertKey

try:
    from numba import types
except ImportError:  # no signatures: njit is the identity (harness.cache.jit)
    types = None  # type: ignore[assignment]


class GroupReplay(NamedTuple):
    """The arrays a compiled replay of one cache group's steps reads and writes (`drive`), built by
    `ExpertCacheBook`. Key positions index the policy's arrays."""

    keys: np.ndarray
    """Key positions of every call's keys: call c's are keys[bounds[c]:bounds[c + 1]] (distinct)."""
    bounds: np.ndarray
    nows: np.ndarray
    """Each call's token step."""
    calls: np.ndarray
    """The group's call indices, in order."""
    slot_of: np.ndarray
    """Key position -> slot (of the whole pool), -1 if not resident."""
    key_of_slot: np.ndarray
    """Slot - first_slot -> key position, -1 if free."""
    first_slot: int
    free: np.ndarray
    """Free slots: free[:n_free[0]], taken from the end."""
    n_free: np.ndarray
    mark: np.ndarray
    """Per key position: the tag (call + 1) of the last call that needed it."""
    hits: np.ndarray
    """Per call (all calls, not only the group's): hits and misses, written by the replay."""
    misses: np.ndarray


_ARRAY = types.int64[::1] if types is not None else None
GROUP_REPLAY = types.NamedTuple([_ARRAY] * 6 + [types.int64] + [_ARRAY] * 5, GroupReplay) if types is not None else None
"""The numba type of a `GroupReplay`: C-contiguous int64 arrays (a tuple's arrays are not converted)."""


@contextmanager
def only(marks: np.ndarray, at: np.ndarray) -> Iterator[np.ndarray]:
    """`marks` (all 1) with the positions `at` at 0 for the duration: a kernel that skips the keys marked 1 (tag 1)
    sees the candidates `at` only (a hook's victim or admission, where the replay marks the step's own keys)."""
    marks[at] = 0
    try:
        yield marks
    finally:
        marks[at] = 1


if types is not None:
    STATE: Any = (types.int64[::1], types.float64[::1], types.int64[:, ::1], types.float64[:, ::1])
    """The types of g, gf, ki, kf: C-contiguous (as the policy builds them), so that kernels index them as such."""
    ACCESS_SIG: Any = types.none(*STATE, types.int64, types.int64, types.boolean)
    KEY_SIG: Any = types.none(*STATE, types.int64, types.int64)
    VICTIM_SIG: Any = types.int64(*STATE, types.int64[:], types.int64[:], types.int64, types.int64, types.int64)
    ADMIT_SIG: Any = types.int64(*STATE, types.int64[:], types.int64[:], types.int64, types.int64, types.int64)
    DRIVE_SIG: Any = types.int64(*STATE, GROUP_REPLAY, types.int64)
else:
    STATE = ACCESS_SIG = KEY_SIG = VICTIM_SIG = ADMIT_SIG = DRIVE_SIG = None

LAYER, EXPERT, WHERE = 0, 1, 2
OLDER, NEWER = WHERE + OLDER_LINK, WHERE + NEWER_LINK
FIRST_COLUMN = WHERE + 3
"""The policy's own int columns start here."""


@njit(**KERNEL, inline="always")
def ranks_below_by(
    score: float, last: float, a: int, other_score: float, other_last: float, b: int, ki: np.ndarray
) -> bool:
    """Key `a`, of value `score` and last use `last`, ranks below key `b`: smaller (value, last use, layer, expert),
    the order of every policy that evicts by a value with recency, then the key, as tie-breaks. For a policy that
    keeps the value and the last use elsewhere than in key columns (`ranks_below`)."""
    return (score, last, ki[a, LAYER], ki[a, EXPERT]) < (other_score, other_last, ki[b, LAYER], ki[b, EXPERT])


@njit(**KERNEL)
def ranks_below(kf: np.ndarray, ki: np.ndarray, a: int, b: int, score: int, last: int) -> bool:
    """`ranks_below_by` with the value in float column `score` and the last use in int column `last`."""
    return ranks_below_by(kf[a, score], ki[a, last], a, kf[b, score], ki[b, last], b, ki)


@njit(ADMIT_SIG, **KERNEL)
def no_admission(
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
    """The `admit` of a policy without admission, which its `drive` never calls (`KERNEL_ADMITS` is False)."""
    return NONE


@njit(KEY_SIG, **KERNEL)
def no_op(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    """A hook the policy does not need."""


@njit(KEY_SIG, **KERNEL, inline="always")
def dequeue(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    """The `evict` of a policy whose resident keys stand in queues linked from `WHERE`: the key leaves its queue."""
    leave(g, ki, key, WHERE)


@njit(ACCESS_SIG, **KERNEL)
def no_access(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int, hit: bool) -> None:
    """An access the policy keeps no state about."""


@dataclass(frozen=True)
class Kernel:
    """A policy's decisions: jitted functions of the signatures above (`ACCESS_SIG`, ...)."""

    access: Any = no_access
    insert: Any = no_op
    evict: Any = no_op
    victim: Any = None
    admit: Any = None
    """None: every miss is admitted (the policy defines no `admit`). Else: the victim the miss replaces, or NONE
    where it streams."""


kernel_access, kernel_insert, kernel_evict, kernel_victim, kernel_admit = (
    no_access,
    no_op,
    no_op,
    no_admission,
    no_admission,
)
"""The kernel functions `drive` calls: in each policy class's copy of it (`driver`), that class's."""
KERNEL_ADMITS = KERNEL_OBSERVES_MISSES = False
"""In each copy of `drive`: whether the policy admits (its `Kernel` has `admit`) and observes misses."""


def drive(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, r: GroupReplay, start: int) -> int:
    """Replay r.calls[start:] of one cache group (`GroupReplay`) with nothing staged, as
    `ExpertCacheBook.account` would, calling the policy's kernel where the book calls its hooks: each call's
    keys (keys[bounds[c]:bounds[c+1]], distinct, at step nows[c]) are accessed in order (misses only where the
    policy observes misses) before any miss is placed; each miss then takes a free slot (free[:n_free[0]], the
    last first), or the slot of the victim among the resident keys the call does not need (`victim`, or where the
    policy admits the victim `admit` returns, NONE for a miss that streams), `evict(victim)`, and is inserted.
    Counts go to hits[c] / misses[c]. Returns the index of the first call it cannot take (wider than the
    group), or len(calls). Never called as it is: each policy class compiles its own copy (`driver`)."""
    # The replay's arrays as locals, taken once: reading `r.field` inside the loop
    # takes and drops a reference (two atomic operations) at each read.
    keys, bounds, nows, calls, slot_of, key_of_slot, first_slot, free, n_free, mark, hits, misses = r
    width_max = 0
    for c in calls:
        width_max = max(width_max, bounds[c + 1] - bounds[c])
    missed = np.empty(width_max, dtype=np.int64)
    capacity = len(key_of_slot)
    for i in range(start, len(calls)):
        c = calls[i]
        a, b = bounds[c], bounds[c + 1]
        if b - a > capacity:
            return i
        now = nows[c]
        tag = c + 1
        m = 0
        for j in range(a, b):
            key = keys[j]
            mark[key] = tag
            if slot_of[key] >= 0:
                kernel_access(g, gf, ki, kf, key, now, True)
            else:
                missed[m] = key
                m += 1
                if KERNEL_OBSERVES_MISSES:
                    kernel_access(g, gf, ki, kf, key, now, False)
        for j in range(m):
            key = missed[j]
            if n_free[0]:
                n_free[0] -= 1
                slot = free[n_free[0]]
            else:
                if KERNEL_ADMITS:
                    out = kernel_admit(g, gf, ki, kf, key_of_slot, mark, tag, key, now)
                    if out == NONE:
                        continue
                else:
                    out = kernel_victim(g, gf, ki, kf, key_of_slot, mark, tag, key, now)
                kernel_evict(g, gf, ki, kf, out, now)
                slot = slot_of[out]
                slot_of[out] = -1
            slot_of[key] = slot
            key_of_slot[slot - first_slot] = key
            kernel_insert(g, gf, ki, kf, key, now)
        hits[c] = b - a - m
        misses[c] = m
    return len(calls)


@functools.cache
def driver(policy: type[CompiledPolicy]) -> Any:
    """`drive` compiled for one policy class: a copy of the function whose globals name that class's kernel
    functions, so that it calls them directly. Through function pointers (one `drive` for every policy), each
    call passed the four state arrays field by field (about 30 values) and could not be inlined: SIEVE and ARC
    replayed at half the speed. Each copy is named after its class's module and name, under which numba caches
    it on disk: only for the harness's own policies, whose sources name the cache's folder (`harness.cache.jit`),
    so that an edited kernel elsewhere is never run from a copy compiled with the old one."""
    k = policy.kernel
    bound = {
        "kernel_access": k.access,
        "kernel_insert": k.insert,
        "kernel_evict": k.evict,
        "kernel_victim": k.victim,
        "kernel_admit": k.admit or no_admission,
        "KERNEL_ADMITS": k.admit is not None,
        "KERNEL_OBSERVES_MISSES": policy.observes_misses,
    }
    name = "drive_" + re.sub(r"\W", "_", f"{policy.__module__}.{policy.__qualname__}")
    copy = FunctionType(drive.__code__, {**drive.__globals__, **bound}, name)
    copy.__qualname__ = name
    own = policy.__module__.split(".")[0] == __name__.split(".")[0]
    return njit(DRIVE_SIG, cache=own)(copy)


@dataclass(frozen=True)
class BoundRows:
    """A compiled policy's bound keys and their rows (`CompiledPolicy.rows`)."""

    index: dict[ExpertKey, int]
    keys: list[ExpertKey]
    ki: np.ndarray
    kf: np.ndarray


class CompiledPolicy(CachePolicy):
    """A policy whose hooks call its `kernel` on its state arrays; subclasses set the class attributes and
    may extend `globals_` and `new_rows`."""

    kernel: ClassVar[Kernel]
    int_columns: ClassVar[tuple[int, ...]] = ()
    """Initial values of the policy's own int columns (from `FIRST_COLUMN`), for a key first seen."""
    float_columns: ClassVar[tuple[float, ...]] = ()
    queues: ClassVar[int] = 0
    """Doubly linked queues the policy keeps (their globals are g[0:3 * queues])."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, seed)
        self.index: dict[ExpertKey, int] = {}
        """Key -> row, in first-seen order (or the order `bind` gave)."""
        self.keys: list[ExpertKey] = []
        g, gf = self.globals_()
        self.g = np.concatenate([np.tile(np.array([NONE, NONE, 0], np.int64), self.queues), g]).astype(np.int64)
        self.gf = np.asarray(gf, dtype=np.float64)
        self.ki = np.zeros((0, FIRST_COLUMN + len(self.int_columns)), dtype=np.int64)
        self.kf = np.zeros((0, len(self.float_columns)), dtype=np.float64)
        self._marks = np.zeros(0, dtype=np.int64)

    def globals_(self) -> tuple[np.ndarray | list[int], np.ndarray | list[float]]:
        """The policy's own int and float globals (after the queues' in `g`)."""
        return [], []

    def new_rows(self, keys: list[ExpertKey]) -> tuple[np.ndarray, np.ndarray]:
        """Rows of `ki` and `kf` for keys first seen."""
        n = len(keys)
        ki = np.empty((n, self.ki.shape[1]), dtype=np.int64)
        ki[:, LAYER] = [layer for layer, _ in keys]
        ki[:, EXPERT] = [expert for _, expert in keys]
        ki[:, WHERE:FIRST_COLUMN] = NONE
        ki[:, FIRST_COLUMN:] = self.int_columns
        kf = np.empty((n, self.kf.shape[1]), dtype=np.float64)
        kf[:] = self.float_columns
        return ki, kf

    @property
    def slots(self) -> int:
        """Keys the state has rows for."""
        return len(self.keys)

    def bind(self, keys: list[ExpertKey]) -> np.ndarray:
        """Rows of `keys` (new ones appended), for the compiled replay."""
        index = self.index
        new = [key for key in dict.fromkeys(keys) if key not in index]
        if new:
            for key in new:
                index[key] = len(index)
                self.keys.append(key)
            ki, kf = self.new_rows(new)
            self.ki = np.concatenate([self.ki, ki])
            self.kf = np.concatenate([self.kf, kf])
            self._marks = np.ones(len(self.keys), dtype=np.int64)
        return np.array([index[key] for key in keys], dtype=np.int64)

    def rows(self) -> BoundRows:
        """A copy of the rows bound so far (`adopt_rows` gives them to another policy of the same kind)."""
        return BoundRows(dict(self.index), list(self.keys), self.ki.copy(), self.kf.copy())

    def adopt_rows(self, rows: BoundRows) -> None:
        """Take `rows` (a fresh policy's: its keys' state as first bound) instead of binding the keys again."""
        self.index, self.keys, self.ki, self.kf = dict(rows.index), list(rows.keys), rows.ki.copy(), rows.kf.copy()
        self._marks = np.ones(len(self.keys), dtype=np.int64)

    def _at(self, key: ExpertKey) -> int:
        i = self.index.get(key)
        return int(self.bind([key])[0]) if i is None else i

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        at = self._at(key)  # first: a new key grows (replaces) the arrays
        self.kernel.access(self.g, self.gf, self.ki, self.kf, at, now, hit)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        at = self._at(key)
        self.kernel.insert(self.g, self.gf, self.ki, self.kf, at, now)

    def on_evict(self, key: ExpertKey, now: int) -> None:
        at = self._at(key)
        self.kernel.evict(self.g, self.gf, self.ki, self.kf, at, now)

    def _choose(self, fn: Any, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> Any:
        """Call `victim` or `admit` with `candidates` as the resident keys, every other key marked."""
        incoming_at = self._at(incoming)
        at = self.bind(list(candidates))
        with only(self._marks, at) as marks:
            return fn(self.g, self.gf, self.ki, self.kf, at, marks, 1, incoming_at, now)

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        chosen = self._choose(self.kernel.victim, candidates, incoming, now)
        if chosen < 0:
            raise AssertionError("victim() called without a resident candidate")
        return self.keys[chosen]

    def replay(self, r: GroupReplay, start: int) -> int:
        """`drive` with this policy's kernel (its class's copy, `driver`) and state."""
        return int(driver(type(self))(self.g, self.gf, self.ki, self.kf, r, start))


class CompiledAdmission(CompiledPolicy):
    """A compiled policy with an admission kernel: `admit` is a hook the book calls."""

    def admit(self, incoming: ExpertKey, candidates: Set[ExpertKey], now: int) -> bool:
        return bool(self._choose(self.kernel.admit, candidates, incoming, now) != NONE)


MT_WORDS = 625
"""Globals a Mersenne Twister takes: CPython's `random.Random` state (624 words, then the position)."""


def mt_state(seed: int) -> list[int]:
    """The generator state of `random.Random(seed)`, for `mt_random` and `mt_below` to continue from: the
    compiled draws are CPython's, bit for bit, so a policy draws the same numbers in both paths as it did
    when it drew from `random.Random` itself."""
    return list(random.Random(seed).getstate()[1])


@njit(types.int64(types.int64[:], types.int64) if types else None, **KERNEL)
def mt_word(g: np.ndarray, at: int) -> int:
    """The next 32-bit output of the Mersenne Twister whose state is g[at:at + MT_WORDS] (MT19937, as CPython)."""
    n, m = 624, 397
    if g[at + n] >= n:
        for kk in range(n):
            y = (g[at + kk] & 0x80000000) | (g[at + (kk + 1) % n] & 0x7FFFFFFF)
            g[at + kk] = g[at + (kk + m) % n] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
        g[at + n] = 0
    y = g[at + g[at + n]]
    g[at + n] += 1
    y ^= y >> 11
    y ^= (y << 7) & 0x9D2C5680
    y ^= (y << 15) & 0xEFC60000
    y ^= y >> 18
    return y & 0xFFFFFFFF


@njit(types.float64(types.int64[:], types.int64) if types else None, **KERNEL)
def mt_random(g: np.ndarray, at: int) -> float:
    """`random.Random.random()`: a float in [0, 1) of 53 random bits."""
    a = mt_word(g, at) >> 5
    b = mt_word(g, at) >> 6
    return (a * 67108864.0 + b) * (1.0 / 9007199254740992.0)


@njit(types.int64(types.int64[:], types.int64, types.int64) if types else None, **KERNEL)
def mt_below(g: np.ndarray, at: int, n: int) -> int:
    """`random.Random._randbelow(n)` for 0 < n < 2**32: k-bit draws until one is below n."""
    k = 0
    while (n >> k) > 0:
        k += 1
    r = mt_word(g, at) >> (32 - k)
    while r >= n:
        r = mt_word(g, at) >> (32 - k)
    return r
