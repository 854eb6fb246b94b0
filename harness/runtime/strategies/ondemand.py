"""Strategy `on-demand` (OD-MoE-style): no expert cache; every expert is loaded just in time.

Each MoE layer has only top-k staging slots. During decode, at layer l the router of layer l+d is
applied to layer l's MoE input and the predicted experts are read into layer l+d's staging slots while
layers l..l+d-1 run; after a layer computes, its slots are emptied (nothing is kept for the next token).
OD-MoE predicts with a quantised shadow model several layers ahead; that is out of reach here, so the
predictor is the later layer's own gate on the current hidden state (`distance` layers ahead). Exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from harness.errors import HarnessError
from harness.runtime.expert_cache import ExpertCache
from harness.runtime.offloaded import OffloadedExperts, Routing
from harness.runtime.strategies.base import CacheRequest, Strategy, register_strategy
from harness.runtime.strategies.prefetch import GatePrefetcher

if TYPE_CHECKING:
    from harness.runtime.engine import OffloadEngine


@register_strategy
class OnDemand(Strategy):
    name = "on-demand"
    forced_scope = "per-layer"
    parameters: ClassVar[dict[str, object]] = {"distance": 1}
    uses_spec_policy = False
    positional = "distance"

    def build(self, engine: OffloadEngine, request: CacheRequest) -> ExpertCache:
        distance = int(self.params["distance"])  # type: ignore[call-overload]
        if distance < 1:
            raise HarnessError("on-demand prediction distance must be at least 1 MoE layer")
        # top_k slots per layer: a decode step needs at most k experts, so one prediction's keys fit.
        cache = engine.configure_cache(engine.index.top_k, "per-layer", "lru", request.seed, request.io_threads)
        self.cache = cache
        self.prefetcher = GatePrefetcher(engine, cache, distance)
        self.deviations = [
            f"predictor: layer l+{distance}'s own gate applied to layer l's hidden state, not OD-MoE's quantised "
            "shadow model (none available); no re-alignment step",
            f"staging memory: top_k={engine.index.top_k} slots per MoE layer, whatever the RAM budget (no cache "
            "by design); prefill loads just in time without prediction",
            "single machine: OD-MoE distributes experts over worker nodes; here one SSD serves every load",
        ]
        return cache

    def before_experts(self, module: OffloadedExperts, hidden_states: torch.Tensor, routing: Routing) -> Routing:
        self.prefetcher.observe_and_predict(module, hidden_states, routing)
        return routing

    def after_experts(self, module: OffloadedExperts) -> None:
        self.cache.discard_layer(module.layer, module.ctx.now)

    def stats(self) -> dict[str, object]:
        return {"predictor": "next-layer gate", **self.prefetcher.stats()}
