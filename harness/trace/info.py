"""`harness trace info`: a trace's shape, phases, per-layer expert popularity skew and reuse distances.

Statistics use the replay's view of the trace (token steps, experts de-duplicated within a step), so
they describe what a cache sees; ROUTING.md gives the range of real traces for the same statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from harness.trace.schema import PHASE_NAMES, Trace
from harness.trace.simulate import build_replay

TOP_SHARE_FRACTION = 0.10
"""Popularity skew = share of a layer's accesses that go to its top 10% of experts (ROUTING.md)."""


@dataclass
class LayerStats:
    layer: int
    accesses: int
    experts_used: int
    top10_share: float
    consecutive_overlap: float
    """Mean fraction of top_k experts shared with the previous step."""
    reuse_p50_steps: float
    reuse_p90_steps: float
    first_use_share: float


@dataclass
class TraceInfo:
    model: str
    source: str
    sequences: int
    rows: int
    steps: int
    layers: list[int]
    num_experts: int
    top_k: int
    expert_bytes: int
    rows_per_phase: dict[str, int]
    per_layer: list[LayerStats]


def trace_info(trace: Trace) -> TraceInfo:
    meta = trace.meta
    replay = build_replay(trace, "all", "never")
    (stream,) = replay.streams
    steps: dict[int, list[tuple[int, list[int]]]] = {layer: [] for layer in replay.layers}
    for layer, keys, now, _ in stream.calls:
        steps[layer].append((now, [e for _, e in keys]))
    per_layer = [_layer_stats(layer, steps[layer], meta.num_experts, meta.top_k) for layer in replay.layers]
    phase = np.concatenate([s.phase for s in trace.sequences])
    return TraceInfo(
        model=meta.model,
        source=meta.source,
        sequences=len(trace.sequences),
        rows=trace.num_rows,
        steps=len(steps[replay.layers[0]]),
        layers=list(meta.moe_layers),
        num_experts=meta.num_experts,
        top_k=meta.top_k,
        expert_bytes=meta.expert_bytes,
        rows_per_phase={name: int((phase == i).sum()) for i, name in enumerate(PHASE_NAMES)},
        per_layer=per_layer,
    )


def _layer_stats(layer: int, steps: list[tuple[int, list[int]]], num_experts: int, top_k: int) -> LayerStats:
    counts = np.zeros(num_experts, dtype=np.int64)
    last: dict[int, int] = {}
    reuse: list[int] = []
    overlaps: list[float] = []
    previous: set[int] = set()
    first_uses = 0
    for i, (now, experts) in enumerate(steps):
        counts[experts] += 1
        current = set(experts)
        if i:
            overlaps.append(len(current & previous) / top_k)
        previous = current
        for e in experts:
            if e in last:
                reuse.append(now - last[e])
            else:
                first_uses += 1
            last[e] = now
    total = int(counts.sum())
    top_n = max(1, math.ceil(TOP_SHARE_FRACTION * num_experts))
    top = np.sort(counts)[::-1][:top_n].sum()
    return LayerStats(
        layer=layer,
        accesses=total,
        experts_used=int((counts > 0).sum()),
        top10_share=float(top / total) if total else 0.0,
        consecutive_overlap=float(np.mean(overlaps)) if overlaps else 0.0,
        reuse_p50_steps=float(np.percentile(reuse, 50)) if reuse else math.nan,
        reuse_p90_steps=float(np.percentile(reuse, 90)) if reuse else math.nan,
        first_use_share=first_uses / total if total else 0.0,
    )
