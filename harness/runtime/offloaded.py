"""The module that replaces a MoE layer's experts: the model's own router picks experts, this module
fetches their weights through the expert cache and applies the model's own expert math.

The arithmetic mirrors transformers' eager experts forward operation for operation, and the expert
outputs are summed in ascending expert order as there, so greedy generation is bit-identical to the
fully resident model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from harness.cache.book import Phase
from harness.runtime.expert_cache import ExpertCache


@dataclass
class StepContext:
    """The logical clock and phase of the forward pass in flight, shared by all offloaded layers."""

    now: int = 0
    phase: Phase = "prefill"
    seq_id: int = 0
    first_pos: int = 0
    events: list = field(default_factory=list)


class RoutingSink(Protocol):
    def record(self, ctx: StepContext, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None: ...


class OffloadedExperts(nn.Module):
    def __init__(
        self,
        layer: int,
        num_experts: int,
        act_fn: nn.Module,
        cache: ExpertCache,
        ctx: StepContext,
        sink: RoutingSink | None = None,
    ) -> None:
        super().__init__()
        self.layer, self.num_experts, self.act_fn = layer, num_experts, act_fn
        self.cache, self.ctx, self.sink = cache, ctx, sink

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        if self.sink is not None:
            self.sink.record(self.ctx, self.layer, top_k_index, top_k_weights)
        experts = [e for e in expert_hit[:, 0].tolist() if e != self.num_experts]
        contributions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for expert, weights in self.cache.fetch(self.layer, experts, self.ctx.now, self.ctx.phase):
            top_k_pos, token_idx = torch.where(expert_mask[expert])
            current_state = hidden_states[token_idx]
            gate, up = F.linear(current_state, weights["gate_up_proj"]).chunk(2, dim=-1)
            current_hidden_states = self.act_fn(gate) * up
            current_hidden_states = F.linear(current_hidden_states, weights["down_proj"])
            current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
            contributions[expert] = (token_idx, current_hidden_states)
        for expert in experts:
            token_idx, current_hidden_states = contributions[expert]
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
        return final_hidden_states
