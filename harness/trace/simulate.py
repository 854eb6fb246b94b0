"""Trace replay: any routing trace through any registered policy at any capacity, via the shared cache loop.

The replay prepares a trace once (`build_replay`: token steps grouped, experts de-duplicated within a step,
keys built once) and then drives `ExpertCacheBook.account`, the very loop the live engine runs, for each
policy and capacity (`run_replay`). `simulate()` is the one-call Python API.

Clock: `now` is the trace's `step` column (the forward-pass index, counted across the whole run); rows of
all sequences that share a step form one step whose experts are de-duplicated per layer, as in the live
engine. With `reset="per-sequence"` each sequence is replayed on its own, into a fresh, empty cache.
Oracles (`needs_future`) receive a `FutureAccesses` of the stream being replayed.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from harness import units
from harness.cache.book import AccessCounts, ExpertCacheBook, prepared_calls
from harness.cache.policies.belady import FutureAccesses
from harness.cache.policies.flashmoe import load_model
from harness.cache.profile import FrequencyProfile
from harness.cache.registry import policy_class, policy_factory
from harness.errors import HarnessError
from harness.keys import PHASES, ExpertKey, Phase, Scope
from harness.trace.schema import PHASE_NAMES, Trace, TraceMeta, read_trace
from harness.trace.split import parse_split, split_trace

log = logging.getLogger(__name__)

PhaseFilter = Literal["all", "prefill", "decode"]
Reset = Literal["never", "per-sequence"]
SCOPES: tuple[Scope, ...] = ("per-layer", "global")
RESETS: tuple[Reset, ...] = ("never", "per-sequence")
PHASE_FILTERS: tuple[PhaseFilter, ...] = ("all", "prefill", "decode")


@dataclass
class Stream:
    """One replay into one cache: flattened (layer, keys, now, phase) calls in order, plus token rows."""

    seq_ids: list[int]
    calls: list[tuple[int, tuple[ExpertKey, ...], int, Phase]]
    tokens: dict[Phase, int]
    _future: FutureAccesses | None = field(default=None, repr=False, compare=False)

    def future(self) -> FutureAccesses:
        """Every key's access times, built once (the simulator replays a stream many times; policies only read it)."""
        if self._future is None:
            # From the arrays the book prepares for the compiled replay (kept for this very call list).
            prepared = prepared_calls(self.calls)
            times = np.repeat(prepared.now, np.diff(prepared.bounds))
            counts = np.bincount(prepared.key_code, minlength=len(prepared.universe))
            order = np.argsort(prepared.key_code, kind="stable")  # stable: each key's times stay ascending
            self._future = FutureAccesses.of_arrays(prepared.universe, np.cumsum(counts) - counts, times[order])
        return self._future


@dataclass
class Replay:
    """A trace prepared for replay under one phase filter and reset mode."""

    layers: list[int]
    num_experts: int
    expert_bytes: int
    phase: PhaseFilter
    reset: Reset
    streams: list[Stream]

    @property
    def accesses(self) -> int:
        return sum(len(keys) for s in self.streams for _, keys, _, _ in s.calls)

    @property
    def seq_ids(self) -> list[int]:
        return [i for s in self.streams for i in s.seq_ids]


@dataclass
class SimulationResult:
    """Hits and misses of one policy at one capacity, per phase and per layer."""

    policy: str
    description: dict[str, object]
    capacity_slots: int
    scope: Scope
    phase: PhaseFilter
    reset: Reset
    seq_ids: list[int]
    counts: dict[Phase, dict[int, AccessCounts]]
    tokens: dict[Phase, int]
    expert_bytes: int
    elapsed_s: float
    notes: list[str] = field(default_factory=list)

    def total(self, phase: Phase | None = None, layer: int | None = None) -> AccessCounts:
        out = AccessCounts()
        for p in PHASES if phase is None else (phase,):
            for lay, c in self.counts[p].items():
                if layer is None or lay == layer:
                    out.hits += c.hits
                    out.misses += c.misses
        return out

    @property
    def hit_rate(self) -> float:
        return self.total().hit_rate

    def bytes_read_per_token(self, phase: Phase | None = None) -> float | None:
        """Expert bytes the misses would read from the SSD, per token row; None when expert_bytes is unknown."""
        tokens = sum(self.tokens[p] for p in (PHASES if phase is None else (phase,)))
        if not self.expert_bytes or not tokens:
            return None
        return self.total(phase).misses * self.expert_bytes / tokens

    def misses_per_token(self, phase: Phase | None = None) -> float:
        tokens = sum(self.tokens[p] for p in (PHASES if phase is None else (phase,)))
        return self.total(phase).misses / tokens if tokens else 0.0


def trace_fingerprint(trace: Trace) -> str:
    """A hash of the routing content (sequences, steps, experts), to recognise a trace a model was trained on."""
    digest = hashlib.sha256()
    for seq in trace.sequences:
        digest.update(np.int64(seq.seq_id).tobytes())
        digest.update(np.ascontiguousarray(seq.step, dtype=np.int32).tobytes())
        digest.update(np.ascontiguousarray(seq.experts, dtype=np.int16).tobytes())
    return digest.hexdigest()[:16]


def build_replay(
    trace: Trace, phase: PhaseFilter = "all", reset: Reset = "never", sequences: Iterable[int] | None = None
) -> Replay:
    """Group the trace into token steps and build the key tuples once; `sequences` restricts to those seq_ids."""
    if phase not in PHASE_FILTERS:
        raise HarnessError(f"unknown phase {phase!r}: use {', '.join(PHASE_FILTERS)}")
    if reset not in RESETS:
        raise HarnessError(f"unknown reset {reset!r}: use {', '.join(RESETS)}")
    seqs = trace.sequences
    if sequences is not None:
        wanted = set(sequences)
        seqs = [s for s in seqs if s.seq_id in wanted]
        missing = wanted - {s.seq_id for s in seqs}
        if missing:
            raise HarnessError(f"the trace has no sequence {sorted(missing)}")
    layers = list(trace.meta.moe_layers)
    for seq in seqs:
        if seq.experts.size and (seq.experts.min() < 0 or seq.experts.max() >= trace.meta.num_experts):
            raise HarnessError(
                f"sequence {seq.seq_id} routes to expert ids {int(seq.experts.min())}..{int(seq.experts.max())}, "
                f"outside the trace's num_experts={trace.meta.num_experts}"
            )
    groups = [seqs] if reset == "never" else [[s] for s in seqs]
    streams = [_stream(group, layers, phase) for group in groups]
    replay = Replay(layers, trace.meta.num_experts, trace.meta.expert_bytes, phase, reset, streams)
    if not replay.accesses:
        raise HarnessError(f"nothing to replay: the trace has no {phase} steps in the chosen sequences")
    return replay


def _stream(seqs: Sequence, layers: list[int], phase_filter: PhaseFilter) -> Stream:
    if not seqs:
        return Stream([], [], dict.fromkeys(PHASES, 0))
    step = np.concatenate([s.step for s in seqs]).astype(np.int64)
    phase = np.concatenate([s.phase for s in seqs])
    experts = np.concatenate([s.experts for s in seqs]).astype(np.int64)  # [rows, layers, k]
    if phase_filter != "all":
        keep = phase == PHASE_NAMES.index(phase_filter)
        step, phase, experts = step[keep], phase[keep], experts[keep]
    if not len(step):
        return Stream([int(s.seq_id) for s in seqs], [], dict.fromkeys(PHASES, 0))
    order = np.argsort(step, kind="stable")
    step, phase, experts = step[order], phase[order], experts[order]
    tokens: dict[Phase, int] = {p: int((phase == PHASE_NAMES.index(p)).sum()) for p in PHASES}
    starts = np.flatnonzero(np.r_[True, step[1:] != step[:-1]])
    ends = np.r_[starts[1:], len(step)]
    keycache = [{e: (layer, e) for e in range(int(experts.max()) + 1)} for layer in layers]
    calls: list[tuple[int, tuple[ExpertKey, ...], int, Phase]] = []
    prefill = PHASE_NAMES.index("prefill")
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        now = int(step[a])
        # A step that holds any prefill row is a prefill step (its rows share one forward pass).
        step_phase: Phase = "prefill" if (phase[a:b] == prefill).any() else "decode"
        block = experts[a:b]
        for li, layer in enumerate(layers):
            cache = keycache[li]
            distinct = sorted(set(block[:, li].ravel().tolist()))
            calls.append((layer, tuple([cache[e] for e in distinct]), now, step_phase))
    return Stream([int(s.seq_id) for s in seqs], calls, tokens)


def run_replay(
    replay: Replay,
    policy_spec: str,
    capacity_slots: int,
    scope: Scope = "per-layer",
    seed: int = 0,
    **context: object,
) -> SimulationResult:
    """Replay every stream through a fresh `ExpertCacheBook`; counts are summed over streams."""
    cls = policy_class(policy_spec)
    counts = {p: {layer: AccessCounts() for layer in replay.layers} for p in PHASES}
    tokens = dict.fromkeys(PHASES, 0)
    description: dict[str, object] = {}
    started = time.perf_counter()
    for stream in replay.streams:
        extra = dict(context)
        if cls.needs_future:
            extra["future"] = stream.future()
        book = ExpertCacheBook(replay.layers, capacity_slots, scope, policy_factory(policy_spec, seed, **extra))
        book.account_stream(stream.calls)
        for p in PHASES:
            tokens[p] += stream.tokens[p]
            for layer, c in book.counts[p].items():
                counts[p][layer].hits += c.hits
                counts[p][layer].misses += c.misses
        description = book.policies[0].describe()
    elapsed = time.perf_counter() - started
    return SimulationResult(
        policy=policy_spec,
        description=description,
        capacity_slots=capacity_slots,
        scope=scope,
        phase=replay.phase,
        reset=replay.reset,
        seq_ids=replay.seq_ids,
        counts=counts,
        tokens=tokens,
        expert_bytes=replay.expert_bytes,
        elapsed_s=elapsed,
    )


def simulate(
    trace: Trace,
    policy_spec: str,
    capacity_slots: int,
    scope: Scope = "per-layer",
    phase: PhaseFilter = "all",
    reset: Reset = "never",
    seed: int = 0,
    sequences: Iterable[int] | None = None,
    **context: object,
) -> SimulationResult:
    """Replay `trace` through one policy at one capacity (slots per layer, or in all for global scope)."""
    return run_replay(build_replay(trace, phase, reset, sequences), policy_spec, capacity_slots, scope, seed, **context)


def parse_capacities(text: str, num_experts: int, num_layers: int, scope: Scope) -> list[int]:
    """'12.5%,25%' (of the experts a cache group can hold), '8,16' (slots) or '10%:90%:10%' -> slots.

    A percentage is of one layer's experts in per-layer scope and of all layers' experts in global scope.
    """
    whole = num_experts * (num_layers if scope == "global" else 1)
    slots = units.parse_capacities(text, whole)
    too_big = [s for s in slots if s > whole]
    if too_big:
        log.warning("capacities %s exceed the %d experts a cache group holds: only first uses miss", too_big, whole)
    return slots


Grid = Callable[[Replay, list[tuple[str, int]], Scope, int, FrequencyProfile | None], list[SimulationResult]]
"""Replays (policy, capacity) cells of one prepared trace; results in the order of the cells."""


def serial_grid(
    replay: Replay, cells: list[tuple[str, int]], scope: Scope, seed: int, profile: FrequencyProfile | None
) -> list[SimulationResult]:
    return [run_replay(replay, spec, capacity, scope, seed, profile=profile) for spec, capacity in cells]


ORACLES = ("belady", "belady-bypass", "static-oracle")
"""Always replayed beside the requested policies: the bounds every comparison is drawn against (Belady: the
optimum with the future; the static-frequency oracle: the best fixed set of experts)."""


def profile_of(replay: Replay, source: str = "") -> FrequencyProfile:
    """Accesses per key and token steps per layer over every stream of a prepared replay."""
    return FrequencyProfile.from_calls(
        ((layer, keys) for stream in replay.streams for layer, keys, _, _ in stream.calls), source
    )


def trace_profile(path: str | Path) -> FrequencyProfile:
    """The frequency profile of a whole trace file (all phases, one stream): `static:PATH` and the like."""
    return profile_of(build_replay(read_trace(path)), str(path))


@dataclass
class ReplayedTrace:
    """What was replayed and how: the head of every simulation's summary (policies and tier stacks alike)."""

    trace_path: str
    meta: TraceMeta
    scope: Scope
    phase: PhaseFilter
    reset: Reset
    seq_ids: list[int]

    def header(self) -> dict[str, object]:
        return {
            "trace": self.trace_path,
            "trace_meta": asdict(self.meta),
            "scope": self.scope,
            "phase": self.phase,
            "reset": self.reset,
            "sequences": self.seq_ids,
        }


@dataclass
class SimulationRun(ReplayedTrace):
    """Every requested policy at every capacity over one prepared trace, with the notes a reader needs."""

    heldout_only: bool
    results: list[SimulationResult]
    notes: list[str]
    split: str | None = None
    """The held-out protocol (`seq:N`, `frac:F`) when the scores are of the held-out part only."""


def run_simulation(
    trace_path: str | Path,
    policies: Sequence[str],
    capacities: str,
    scope: Scope = "per-layer",
    phase: PhaseFilter = "all",
    reset: Reset = "never",
    seed: int = 0,
    expert_bytes: int | None = None,
    split: str | None = None,
    grid: Grid | None = None,
) -> SimulationRun:
    """The `harness simulate` matrix. A FlashMoE model trained on this very trace restricts every
    policy to the sequences it held out, so the comparison never uses what the network has seen.
    With `split` (`harness.trace.split`), profile-based policies profile the training part and every
    policy, the bounds included, is scored on the held-out part only. `grid` replays the (policy,
    capacity) cells (default: one after the other here; harness.cluster: on Ray)."""
    if scope not in SCOPES:
        raise HarnessError(f"unknown cache scope {scope!r}: use per-layer or global")
    trace = read_trace(trace_path)
    parsed = parse_split(split) if split is not None else None
    specs = list(dict.fromkeys(p.strip() for p in policies if p.strip()))
    if not specs:
        raise HarnessError("no policy given: e.g. --policy lru,lfu")
    specs += [o for o in ORACLES if o not in specs]
    fingerprint = trace_fingerprint(trace)  # of the whole trace, as `harness policy train` records it
    profile: FrequencyProfile | None = None
    notes: list[str] = []
    if parsed is not None:
        train_part, trace = split_trace(trace, parsed)
        profile = profile_of(build_replay(train_part, phase), f"{trace_path} ({parsed}, training part)")
        notes.append(
            f"held-out protocol {parsed}: scores are of the held-out part only, replayed into an empty cache; "
            "profile-based policies were profiled on the training part"
        )
    for spec in specs:
        if not policy_class(spec).needs_future:
            # A bad argument (lfu-window:x, lru:3) or a missing profile fails now, not after a replay.
            policy_factory(spec, seed, profile=profile)(1)
        if policy_class(spec).profiled and ":" in spec and parsed is None:
            notes.append(f"{spec}: profiled on {spec.split(':', 1)[1]}; honest only where that is another trace")
    sequences: set[int] | None = None
    for spec in specs:
        if policy_class(spec).name != "flashmoe":
            continue
        model = load_model(spec.split(":", 1)[1]) if ":" in spec else None
        if model is None:
            raise HarnessError("flashmoe needs a model file: flashmoe:PATH (train one with `harness policy train`)")
        if model.meta.get("trace_fingerprint") == fingerprint and "heldout_sequences" not in model.meta:
            trained_split = model.meta.get("split")
            if parsed is None or str(parsed) != trained_split:
                raise HarnessError(
                    f"{spec} was trained on the training part of split {trained_split} of this trace: "
                    f"replay with --split {trained_split} so that it is scored on held-out steps only"
                )
        elif model.meta.get("trace_fingerprint") == fingerprint:
            heldout = {int(s) for s in model.meta.get("heldout_sequences", [])}  # type: ignore[attr-defined]
            sequences = heldout if sequences is None else sequences & heldout
        else:
            notes.append(f"{spec}: trained on another trace ({model.meta.get('trace')}); all sequences replayed")
    if sequences is not None:
        sequences &= {s.seq_id for s in trace.sequences}  # with --split, of the held-out part only
        if not sequences:
            raise HarnessError("the FlashMoE models share no held-out sequence of this trace: nothing honest to replay")
        notes.append(
            f"held-out sequences only ({sorted(sequences)}): a FlashMoE model was trained on the others of this "
            "trace, and scores on its training sequences are not honest (README)"
        )
    replay = build_replay(trace, phase, reset, sequences)
    if expert_bytes is not None:
        replay.expert_bytes = expert_bytes
    if not replay.expert_bytes:
        notes.append("expert size unknown (trace expert_bytes = 0): bytes per token not reported; use --expert-bytes")
    slots = parse_capacities(capacities, trace.meta.num_experts, len(replay.layers), scope)
    results = (grid or serial_grid)(
        replay, [(spec, capacity) for spec in specs for capacity in slots], scope, seed, profile
    )
    for result in results:
        log.info(
            "%s @ %d slots: hit rate %.4f (%.2fs)",
            result.policy,
            result.capacity_slots,
            result.hit_rate,
            result.elapsed_s,
        )
    return SimulationRun(
        trace_path=str(trace_path),
        meta=trace.meta,
        scope=scope,
        phase=phase,
        reset=reset,
        seq_ids=replay.seq_ids,
        heldout_only=sequences is not None or parsed is not None,
        results=results,
        notes=notes,
        split=None if parsed is None else str(parsed),
    )
