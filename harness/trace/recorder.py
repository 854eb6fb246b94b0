"""Records the routing of a live run, one row per (token, MoE layer), into the trace format."""

from __future__ import annotations

import torch

from harness.runtime.offloaded import StepContext
from harness.trace.schema import TraceMeta, TraceWriter


class RoutingRecorder:
    """A `RoutingSink` for the offloaded-experts modules; experts are stored by descending weight."""

    def __init__(self, meta: TraceMeta) -> None:
        self.writer = TraceWriter(meta)

    def record(self, ctx: StepContext, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        weights = top_k_weights.detach().float()
        order = torch.argsort(weights, dim=-1, descending=True, stable=True)
        experts = torch.gather(top_k_index, -1, order).tolist()
        weights = torch.gather(weights, -1, order).tolist()
        for t, (ids, ws) in enumerate(zip(experts, weights, strict=True)):
            self.writer.add(ctx.seq_id, ctx.first_pos + t, ctx.now, ctx.phase, layer, ids, ws)
