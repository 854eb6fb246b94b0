"""Routing statistics that tell realistic routing from degenerate routing (ROUTING.md's measures)."""

from __future__ import annotations

import numpy as np

from harness.trace.schema import Trace

TOP_SHARE_FRACTION = 0.10
"""'Share of accesses to the top 10% of experts' (ROUTING.md)."""
REAL_RANGE = {
    "top10_share": (0.13, 0.27),
    "consecutive_overlap": (0.10, 0.24),
    "lru_hit_rate_25pct": (0.26, 0.40),
    "lfu_hit_rate_25pct": (0.29, 0.47),
    "belady_hit_rate_25pct": (0.52, 0.59),
    "lru_hit_rate_50pct": (0.53, 0.65),
    "belady_hit_rate_50pct": (0.79, 0.83),
}
"""Range of real traces of trained models (OLMoE-1B-7B, FLAME-MoE-290M, Qwen1.5-MoE-A2.7B), ROUTING.md."""


def routing_stats(trace: Trace) -> dict[str, object]:
    """Per-layer and mean top-10% share and consecutive-token overlap, over token rows in order."""
    num_experts, k = trace.meta.num_experts, trace.meta.top_k
    layers = trace.meta.moe_layers
    top_n = max(1, round(TOP_SHARE_FRACTION * num_experts))
    per_layer: dict[str, dict[str, float]] = {}
    for li, layer in enumerate(layers):
        counts = np.zeros(num_experts, dtype=np.int64)
        overlap_sum, overlap_n = 0.0, 0
        for seq in trace.sequences:
            ids = seq.experts[:, li, :].astype(np.int64)
            counts += np.bincount(ids.ravel(), minlength=num_experts)
            if len(ids) > 1:
                onehot = np.zeros((len(ids), num_experts), dtype=bool)
                np.put_along_axis(onehot, ids, True, axis=1)
                overlap_sum += float((onehot[1:] & onehot[:-1]).sum()) / k
                overlap_n += len(ids) - 1
        total = counts.sum()
        per_layer[str(layer)] = {
            "top10_share": float(np.sort(counts)[::-1][:top_n].sum() / total) if total else 0.0,
            "consecutive_overlap": overlap_sum / overlap_n if overlap_n else 0.0,
        }
    mean = {
        name: float(np.mean([v[name] for v in per_layer.values()])) for name in ("top10_share", "consecutive_overlap")
    }
    return {**mean, "per_layer": per_layer, "tokens": trace.num_rows}
