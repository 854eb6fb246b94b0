"""Routing statistics that tell realistic from degenerate routing (README, "Routing of random-init models").

One computation for every caller: `result.json` of a run (`routing_stats`), `harness trace info` and
the routing benchmark. It follows the replay's convention (one access per step, layer and distinct
expert: what a cache sees), so a prefill forward pass over many tokens counts as one step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.trace.schema import Trace
from harness.trace.simulate import build_replay

TOP_SHARE_FRACTION = 0.10
"""Popularity skew = share of a layer's accesses that go to its top 10% of experts, the 10% rounded up
to whole experts (7 of 64): uniform routing then gives the README's 0.12."""
REAL_RANGE: dict[str, tuple[float, float]] = {
    "top10_share": (0.13, 0.27),
    "consecutive_overlap": (0.10, 0.24),
    "lru_hit_rate_25pct": (0.26, 0.40),
    "lfu_hit_rate_25pct": (0.29, 0.47),
    "belady_hit_rate_25pct": (0.52, 0.59),
    "lru_hit_rate_50pct": (0.53, 0.65),
    "belady_hit_rate_50pct": (0.79, 0.83),
}
"""Range of real traces of trained models (OLMoE-1B-7B, FLAME-MoE-290M, Qwen1.5-MoE-A2.7B), as in the README."""


@dataclass
class LayerStats:
    layer: int
    steps: int
    accesses: int
    experts_used: int
    top10_share: float
    consecutive_overlap: float
    """Mean fraction of top_k experts shared with the previous step."""
    reuse_p50_steps: float
    reuse_p90_steps: float
    first_use_share: float


def layer_stats(trace: Trace) -> list[LayerStats]:
    """Per MoE layer: accesses, popularity skew, consecutive-step overlap and reuse distances."""
    replay = build_replay(trace, "all", "never")
    (stream,) = replay.streams
    steps: dict[int, list[tuple[int, list[int]]]] = {layer: [] for layer in replay.layers}
    for layer, keys, now, _ in stream.calls:
        steps[layer].append((now, [e for _, e in keys]))
    return [_one_layer(layer, steps[layer], trace.meta.num_experts, trace.meta.top_k) for layer in replay.layers]


def routing_stats(trace: Trace) -> dict[str, Any]:
    """Mean over layers of the top-10% share and consecutive overlap, and both per layer (for result.json)."""
    per_layer = {
        str(s.layer): {"top10_share": s.top10_share, "consecutive_overlap": s.consecutive_overlap}
        for s in layer_stats(trace)
    }
    mean = {
        name: float(np.mean([v[name] for v in per_layer.values()])) for name in ("top10_share", "consecutive_overlap")
    }
    return {**mean, "per_layer": per_layer, "tokens": trace.num_rows}


def _one_layer(layer: int, steps: list[tuple[int, list[int]]], num_experts: int, top_k: int) -> LayerStats:
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
        steps=len(steps),
        accesses=total,
        experts_used=int((counts > 0).sum()),
        top10_share=float(top / total) if total else 0.0,
        consecutive_overlap=float(np.mean(overlaps)) if overlaps else 0.0,
        reuse_p50_steps=float(np.percentile(reuse, 50)) if reuse else math.nan,
        reuse_p90_steps=float(np.percentile(reuse, 90)) if reuse else math.nan,
        first_use_share=first_uses / total if total else 0.0,
    )
