"""`harness trace info`: a trace's shape, phases, per-layer expert popularity skew and reuse distances.

The per-layer statistics are `harness.trace.stats.layer_stats`, the same that a run writes into its
result.json; the README ("Routing of random-init models") gives the range of real traces for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.trace.schema import PHASE_NAMES, Trace
from harness.trace.stats import LayerStats, layer_stats


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
    per_layer = layer_stats(trace)
    phase = np.concatenate([s.phase for s in trace.sequences])
    return TraceInfo(
        model=meta.model,
        source=meta.source,
        sequences=len(trace.sequences),
        rows=trace.num_rows,
        steps=per_layer[0].steps,
        layers=list(meta.moe_layers),
        num_experts=meta.num_experts,
        top_k=meta.top_k,
        expert_bytes=meta.expert_bytes,
        rows_per_phase={name: int((phase == i).sum()) for i, name in enumerate(PHASE_NAMES)},
        per_layer=per_layer,
    )
