"""Records the routing of a live run, one row per (token, MoE layer), into the trace format.

Part of the runtime (it is a `RoutingSink` of the offloaded-experts modules): the trace package
describes and replays traces and never imports the runtime.
"""

from __future__ import annotations

import torch

from harness.runtime.offloaded import StepContext
from harness.store.layout import PackIndex
from harness.trace.schema import TraceMeta, TraceWriter


def trace_meta(model: str, config: object, index: PackIndex, source: str) -> TraceMeta:
    """The trace metadata of a packed model: its MoE layers, experts, top-k and expert size."""
    return TraceMeta(
        model=model,
        architecture=config.model_type,  # type: ignore[attr-defined]
        num_layers=config.get_text_config().num_hidden_layers,  # type: ignore[attr-defined]  # a wrapper's text model
        moe_layers=index.moe_layers,
        num_experts=index.num_experts,
        top_k=index.top_k,
        expert_bytes=index.expert_bytes,
        source=source,
    )


class RoutingRecorder:
    """A `RoutingSink` for the offloaded-experts modules; experts are stored by descending weight.

    The step of a row is the forward pass (`ctx.now`); with `token_steps`, a forward pass over T tokens
    (teacher-forced text) gives its rows the steps now .. now + T - 1, as if each token were decoded.
    """

    def __init__(self, meta: TraceMeta, token_steps: bool = False) -> None:
        self.writer = TraceWriter(meta)
        self.token_steps = token_steps

    def record(self, ctx: StepContext, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        scores = top_k_weights.detach().float()
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
        experts = torch.gather(top_k_index, -1, order).tolist()
        weights = torch.gather(scores, -1, order).tolist()
        for t, (ids, ws) in enumerate(zip(experts, weights, strict=True)):
            step = ctx.now + t if self.token_steps else ctx.now
            self.writer.add(ctx.seq_id, ctx.first_pos + t, step, ctx.phase, layer, ids, ws)
