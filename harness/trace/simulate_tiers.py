"""Trace replay through a tier stack (`harness simulate --tiers`): hits per tier, bytes per tier edge.

The trace is prepared once by `build_replay` (the same steps, clock and reset modes as the single-cache
simulator) and each stream is replayed through a fresh `TierStack`. With one tier the counts are those of
`run_replay` exactly (the stack's `account_stream` is the book's). Semantics of a stack: `harness.cache.tiers`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.cache.book import AccessCounts
from harness.cache.registry import policy_class
from harness.cache.tiers import SEMANTICS, TierSpec, TierStack, parse_tiers
from harness.errors import HarnessError
from harness.keys import PHASES, Phase, Scope
from harness.trace.schema import read_trace
from harness.trace.simulate import SCOPES, PhaseFilter, Replay, ReplayedTrace, Reset, build_replay


@dataclass
class TierSimulationResult:
    """One tier stack replayed over one trace: each tier's hits and misses per phase and layer."""

    tiers: list[TierSpec]
    edges: list[str]
    scope: Scope
    counts: list[dict[Phase, dict[int, AccessCounts]]]
    """Per tier, top first; a tier's accesses are the misses of the tier above."""
    tokens: dict[Phase, int]
    expert_bytes: int
    elapsed_s: float

    @property
    def label(self) -> str:
        return ",".join(t.label for t in self.tiers)

    def total(self, tier: int, phase: Phase | None = None, layer: int | None = None) -> AccessCounts:
        return _total(self.counts[tier], phase, layer)

    def served_share(self, tier: int) -> float:
        """Share of all expert accesses (the top tier's) that tier `tier` served."""
        return self.rows()[tier]["served_share"]  # type: ignore[return-value]

    @property
    def ssd_reads(self) -> int:
        return self.total(len(self.tiers) - 1).misses

    def edge_bytes_per_token(self, tier: int) -> float | None:
        """Expert bytes that cross the edge below `tier` per token row; None when the expert size is unknown."""
        return self.rows()[tier]["edge_bytes_per_token"]  # type: ignore[return-value]

    def rows(self) -> list[dict[str, object]]:
        """One row per tier, top first (the CSV and JSON rows)."""
        return tier_rows(self.tiers, self.edges, self.scope, self.counts, self.tokens, self.expert_bytes)


def _total(
    counts: dict[Phase, dict[int, AccessCounts]], phase: Phase | None = None, layer: int | None = None
) -> AccessCounts:
    """One tier's hits and misses summed over phases (or one phase) and layers (or one layer)."""
    out = AccessCounts()
    for p in PHASES if phase is None else (phase,):
        for lay, c in counts[p].items():
            if layer is None or lay == layer:
                out.hits += c.hits
                out.misses += c.misses
    return out


def tier_rows(
    tiers: Sequence[TierSpec],
    edges: Sequence[str],
    scope: Scope,
    counts: Sequence[dict[Phase, dict[int, AccessCounts]]],
    tokens: dict[Phase, int],
    expert_bytes: int,
) -> list[dict[str, object]]:
    """One row per tier, top first: the simulator's rows and a live run's `metrics.tiers` (same keys).

    `counts` are each tier's hits and misses per phase and layer (a tier's accesses are the misses of the tier
    above); `tokens` the token rows per phase. `served_share` is the share of all expert accesses (the top
    tier's) the tier served; `edge_bytes_per_token` the expert bytes crossing the edge below the tier (one
    expert per miss there) per token row, None when the expert size is unknown; `_decode` figures count
    decode steps only.
    """
    accesses = _total(counts[0]).accesses
    all_tokens = sum(tokens.values())

    def per_token(misses: int, rows: int) -> float | None:
        return misses * expert_bytes / rows if expert_bytes and rows else None

    rows: list[dict[str, object]] = []
    for i, (tier, edge) in enumerate(zip(tiers, edges, strict=True)):
        total, decode = _total(counts[i]), _total(counts[i], "decode")
        rows.append(
            {
                "stack": ",".join(t.label for t in tiers),
                "tier": i,
                "kind": tier.kind,
                "policy": tier.policy,
                "capacity_slots": tier.capacity,
                "scope": "global" if tier.modelled else scope,
                "modelled": tier.modelled,
                "accesses": total.accesses,
                "hits": total.hits,
                "misses": total.misses,
                "hit_rate": total.hit_rate,
                "served_share": total.hits / accesses if accesses else 0.0,
                "edge_below": edge,
                "edge_bytes_per_token": per_token(total.misses, all_tokens),
                "hit_rate_decode": decode.hit_rate,
                "edge_bytes_per_token_decode": per_token(decode.misses, tokens.get("decode", 0)),
            }
        )
    return rows


def run_tier_replay(
    replay: Replay, tiers: Sequence[TierSpec], scope: Scope = "per-layer", seed: int = 0, **context: object
) -> TierSimulationResult:
    """Replay every stream through a fresh `TierStack`; counts are summed over streams."""
    counts = [{p: {layer: AccessCounts() for layer in replay.layers} for p in PHASES} for _ in tiers]
    tokens = dict.fromkeys(PHASES, 0)
    edges: list[str] = []
    started = time.perf_counter()
    for stream in replay.streams:
        extra = dict(context)
        if len(tiers) == 1 and not tiers[0].modelled and policy_class(tiers[0].policy).needs_future:
            extra["future"] = stream.future()
        stack = TierStack(replay.layers, tiers, scope, seed, **extra)
        edges = stack.edges()
        stack.account_stream(stream.calls)
        for p in PHASES:
            tokens[p] += stream.tokens[p]
        for i in range(len(tiers)):
            for p in PHASES:
                for layer, c in stack.counts(i)[p].items():
                    counts[i][p][layer].hits += c.hits
                    counts[i][p][layer].misses += c.misses
    return TierSimulationResult(
        tiers=list(tiers),
        edges=edges,
        scope=scope,
        counts=counts,
        tokens=tokens,
        expert_bytes=replay.expert_bytes,
        elapsed_s=time.perf_counter() - started,
    )


@dataclass
class TierSimulationRun(ReplayedTrace):
    """Every requested tier stack over one prepared trace."""

    results: list[TierSimulationResult]
    notes: list[str] = field(default_factory=list)


def run_tier_simulation(
    trace_path: str | Path,
    stacks: Sequence[str],
    scope: Scope = "per-layer",
    phase: PhaseFilter = "all",
    reset: Reset = "never",
    seed: int = 0,
    expert_bytes: int | None = None,
) -> TierSimulationRun:
    """The `harness simulate --tiers` run: each stack (e.g. 'device:lru:48,host:lfu:256') over the trace."""
    if scope not in SCOPES:
        raise HarnessError(f"unknown cache scope {scope!r}: use per-layer or global")
    parsed = [parse_tiers(text) for text in stacks]
    if not parsed:
        raise HarnessError("no tier stack given: e.g. --tiers device:lru:48,host:lfu:256")
    trace = read_trace(trace_path)
    replay = build_replay(trace, phase, reset)
    if expert_bytes is not None:
        replay.expert_bytes = expert_bytes
    notes: list[str] = []
    if not replay.expert_bytes:
        notes.append("expert size unknown (trace expert_bytes = 0): bytes per token not reported; use --expert-bytes")
    if any(t.modelled for tiers in parsed for t in tiers):
        notes.append(
            "the page-cache tier is a model: one LRU over experts shared by all layers; the kernel's own "
            "replacement (active/inactive lists, readahead, pages) differs, and a live run measures it"
        )
    results = [run_tier_replay(replay, tiers, scope, seed) for tiers in parsed]
    return TierSimulationRun(
        trace_path=str(trace_path),
        meta=trace.meta,
        scope=scope,
        phase=phase,
        reset=reset,
        seq_ids=replay.seq_ids,
        results=results,
        notes=notes,
    )


def write_tier_outputs(run: TierSimulationRun, out: Path) -> list[Path]:
    """tiers.csv (one row per stack and tier) and tiers.json (the same rows, the trace and the notes) under `out`."""
    import pandas as pd

    from harness.results import write_json_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for result in run.results for row in result.rows()]
    csv_path = out / "tiers.csv"
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    summary = run.header() | {
        "semantics": SEMANTICS,
        "notes": run.notes,
        "tiers": rows,
    }
    return [csv_path, write_json_atomic(out / "tiers.json", summary)]
