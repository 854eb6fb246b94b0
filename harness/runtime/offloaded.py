"""The module that replaces a MoE layer's experts: the model's own router picks experts, this module
fetches their weights through an expert source (the expert cache, or a strategy's mapped file) and
applies the model's own expert math.

The arithmetic mirrors transformers' eager experts forward operation for operation, and the expert
outputs are summed in ascending expert order as there, so greedy generation is bit-identical to the
fully resident model. A strategy may look at each layer's input before its experts run (to prefetch
or predict) and, if it is approximate, replace the routing and supply expert outputs it computed early.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from harness.keys import Phase
from harness.models.adapters import eager_forward
from harness.models.quant import QuantFormat, dequantize
from harness.runtime.device import DeviceTimeline, to_device
from harness.store.layout import SCALE_SUFFIX

ExpertWeights = dict[str, torch.Tensor]
Contribution = tuple[torch.Tensor, torch.Tensor]
"""(token indices, weighted expert output rows) of one expert in one layer."""


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


class ExpertSource(Protocol):
    """Where expert weights come from: `ExpertCache` (slots + O_DIRECT reads) or a strategy's mapped file."""

    def fetch(self, layer: int, experts: list[int], now: int, phase: Phase) -> Iterator[tuple[int, ExpertWeights]]: ...

    def snapshot(self) -> object:
        """A copy of every measured counter (hits, reads, bytes), for an unmeasured pass to be undone."""
        ...

    def restore(self, saved: object) -> None:
        """Put back the counters of `snapshot`."""
        ...


@dataclass
class Routing:
    """The routing a layer computes with, and outputs of experts a strategy already computed."""

    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor
    precomputed: dict[int, Contribution] = field(default_factory=dict)


class LayerHooks(Protocol):
    """A strategy's view of each MoE layer's forward pass (see harness.runtime.strategies)."""

    def before_experts(self, module: OffloadedExperts, hidden_states: torch.Tensor, routing: Routing) -> Routing: ...

    def after_experts(self, module: OffloadedExperts) -> None: ...


class ExpertMath:
    """One expert's arithmetic, taken from the model's own experts module: the class's eager forward,
    called on the rows routed to one expert with that expert's weights in place of the stacked ones.

    The weights are set as views expanded over the expert dimension (no copies), so the forward indexes
    them as it indexes its own parameters, and every operation (biases, transposed or interleaved
    layouts, clamped activations) is the model's own. Quantized weights are dequantized first. Each call
    builds its own stand-in module (a shallow copy of the original's attributes), so strategies may call it
    from another thread.
    """

    def __init__(self, original: nn.Module, params: list[str], quant: QuantFormat | None, dtype: torch.dtype) -> None:
        self._cls = type(original)
        self._forward = eager_forward(original)
        self.signature = inspect.signature(self._forward)
        """The experts class's forward signature: how its MoE block passes (hidden, top-k index, top-k weights)."""
        self._state = dict(original.__dict__)
        self._state["_parameters"] = {k: v for k, v in original._parameters.items() if k not in params}
        self.params, self.quant, self.dtype = params, quant, dtype
        self.num_experts = int(getattr(original, params[0]).shape[0])
        self.timeline: DeviceTimeline | None = None
        """CUDA runs: where copies and computes are timed (harness.runtime.device); None on the CPU."""

    def weights(self, weights: ExpertWeights) -> ExpertWeights:
        """The expert's weights in the compute dtype (dequantized where stored quantized)."""
        out = {}
        for name in self.params:
            scale = weights.get(name + SCALE_SUFFIX)
            tensor = weights[name]
            out[name] = tensor if scale is None else dequantize(tensor, scale, self.quant, self.dtype)  # type: ignore[arg-type]
        return out

    def __call__(
        self, weights: ExpertWeights, current_state: torch.Tensor, routing_weights: torch.Tensor
    ) -> torch.Tensor:
        # The expert computes where its rows are; weights on another device are copied there (harness.runtime.device).
        weights, copied = to_device(weights, current_state.device, self.timeline)
        proxy = self._cls.__new__(self._cls)
        proxy.__dict__.update(self._state)
        for name, tensor in self.weights(weights).items():
            proxy.__dict__[name] = tensor.unsqueeze(0).expand(self.num_experts, *tensor.shape)
        index = torch.zeros(current_state.shape[0], 1, dtype=torch.long, device=current_state.device)
        if self.timeline is None or current_state.device.type != "cuda":  # CPU computes are not device spans
            out = self._forward(proxy, current_state, index, routing_weights)
        else:
            out = self.timeline.compute(lambda: self._forward(proxy, current_state, index, routing_weights))
        if copied is not None:
            copied.synchronize()  # the source slot may be rewritten once the caller moves on: its copy must be done
        return out


def expert_forward(
    math: ExpertMath, weights: ExpertWeights, current_state: torch.Tensor, routing_weights: torch.Tensor
) -> torch.Tensor:
    """One expert's weighted output rows ([rows, 1] routing weights), op for op as the model's eager forward."""
    return math(weights, current_state, routing_weights)


class OffloadedExperts(nn.Module):
    def __init__(
        self,
        layer: int,
        num_experts: int,
        math: ExpertMath,
        cache: ExpertSource,
        ctx: StepContext,
        sink: RoutingSink | None = None,
    ) -> None:
        super().__init__()
        self.layer, self.num_experts, self.math = layer, num_experts, math
        self.cache, self.ctx, self.sink = cache, ctx, sink
        self.hooks: LayerHooks | None = None

    def forward(self, hidden_states: torch.Tensor, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        # The MoE block calls its experts as it calls the original class (positional or by that class's names).
        bound = self.math.signature.bind(None, hidden_states, *args, **kwargs).arguments
        top_k_index, top_k_weights = (bound[name] for name in list(self.math.signature.parameters)[2:4])
        routing = Routing(top_k_index, top_k_weights)
        if self.hooks is not None:
            routing = self.hooks.before_experts(self, hidden_states, routing)
            top_k_index, top_k_weights = routing.top_k_index, routing.top_k_weights
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        if self.sink is not None:
            self.sink.record(self.ctx, self.layer, top_k_index, top_k_weights)
        experts = [e for e in expert_hit[:, 0].tolist() if e != self.num_experts]
        contributions: dict[int, Contribution] = dict(routing.precomputed)
        for expert, weights in self.cache.fetch(self.layer, experts, self.ctx.now, self.ctx.phase):
            if expert in contributions:
                continue  # computed early by the strategy; the fetch still counts the access
            top_k_pos, token_idx = torch.where(expert_mask[expert])
            current_state = hidden_states[token_idx]
            out = expert_forward(self.math, weights, current_state, top_k_weights[token_idx, top_k_pos, None])
            contributions[expert] = (token_idx, out)
        for expert in experts:
            token_idx, current_hidden_states = contributions[expert]
            # The eager forward's index_add_, as index_put_ with accumulation: bit-identical sums (one expert's
            # token indices are distinct), but index_add_ on CPU enters an OpenMP region per call: at one decode
            # row it took more CPU than the expert's matrix products on a busy 2-core machine (engine_overhead).
            final_hidden_states.index_put_((token_idx,), current_hidden_states.to(final_hidden_states.dtype), True)
        if self.hooks is not None:
            self.hooks.after_experts(self)
        return final_hidden_states
