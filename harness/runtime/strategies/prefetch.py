"""Strategy `prefetch`: the expert cache under the spec's policy, plus prefetching by the next layer's gate.

During decode, when MoE layer l starts, layer l+d's router (d = `distance`, 1 by default: the next-layer
gate of mixtral-offloading and AdapMoE) is applied to layer l's MoE input; the predicted experts are
staged in the cache and read in the background, after layer l's own demand loads, while layer l computes
(`top=N`: only each token's N heaviest predicted experts, fewer wasted reads for a lower recall; N above k: its N
likeliest, the k predicted and the next highest router logits, a higher recall for more reads).
A demand step that finds a prefetched expert counts a hit. Exact: the model computes with its own routing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from harness.errors import HarnessError
from harness.keys import Phase
from harness.runtime.expert_cache import ExpertCache
from harness.runtime.offloaded import OffloadedExperts, Routing
from harness.runtime.strategies.base import (
    CacheRequest,
    GatePredictor,
    Recall,
    Strategy,
    layer_experts,
    prediction_reads,
    protect_keys,
    register_strategy,
    top_deviations,
)

if TYPE_CHECKING:
    from harness.runtime.engine import OffloadEngine


class GatePrefetcher:
    """Predicts layer l+d's experts from layer l's MoE input, stages and reads them; scores the predictions."""

    def __init__(
        self,
        engine: OffloadEngine,
        cache: ExpertCache,
        distance: int,
        phases: tuple[Phase, ...] = ("decode",),
        stage: bool = True,
        top: int = 0,
    ) -> None:
        if distance < 1:
            raise HarnessError(f"the prediction distance must be at least 1 MoE layer (got {distance})")
        self.gates = GatePredictor(engine)
        self.cache, self.distance, self.phases, self.stage, self.top = cache, distance, phases, stage, top
        """`stage` False: predictions are scored, not read. `top` between 1 and k - 1: only each token's `top`
        heaviest predicted experts are read (`likely_experts`), the recall still scoring the whole prediction; above k:
        the prediction is widened to `top` experts per token (`widened`), all read and scored."""
        self.recall = Recall()
        """Scored on decode steps."""
        self._pending: dict[int, set[int]] = {}

    def predicted_for(self, layer: int) -> set[int]:
        """The experts predicted for `layer`'s coming decode step (empty if none)."""
        return self._pending.get(layer, set())

    def observe_and_predict(self, module: OffloadedExperts, hidden_states: torch.Tensor, routing: Routing) -> None:
        ctx, layer = module.ctx, module.layer
        if ctx.phase not in self.phases:
            return
        predicted = self._pending.pop(layer, None)
        if predicted is not None:
            self.recall.add(predicted, layer_experts(routing.top_k_index))
        target = self.gates.target(layer, self.distance)
        if target is None:
            return
        logits, weights, indices = self.gates.predict(target, hidden_states)
        predicted, staged, kept = prediction_reads(target, logits, weights, indices, self.top)
        if ctx.phase == "decode":
            self._pending[target] = predicted
        if not self.stage:
            return
        # The step in flight's keys keep their slots too. Deferred: this layer's demand loads, submitted next,
        # go to the device first.
        self.cache.prefetch(target, staged, ctx.now, ctx.phase, protect_keys(layer, routing) + kept, defer=True)

    def stats(self) -> dict[str, object]:
        return {"prediction": self.recall.to_dict(), "prefetch": self.cache.prefetch_stats.to_dict()}


@register_strategy
class NextLayerPrefetch(Strategy):
    name = "prefetch"
    parameters: ClassVar[dict[str, object]] = {"distance": 1, "top": 0}
    positional = "distance"

    def build(self, engine: OffloadEngine, request: CacheRequest) -> ExpertCache:
        cache = engine.configure_cache(request.slots, request.scope, request.policy, request.seed, request.io_threads)
        self.prefetcher = GatePrefetcher(
            engine,
            cache,
            int(self.params["distance"]),  # type: ignore[call-overload]
            top=int(self.params["top"]),  # type: ignore[call-overload]
        )
        self.deviations = [
            "prefetches during decode only (prefill routes many tokens per layer; no prediction is made there)",
            "a prefetched expert is staged outside the policy until used; one its layer's next step does not "
            "use is dropped (counted as wasted)",
            *top_deviations(self.prefetcher.top, engine.index.top_k, engine.index.num_experts),
        ]
        return cache

    def before_experts(self, module: OffloadedExperts, hidden_states: torch.Tensor, routing: Routing) -> Routing:
        self.prefetcher.observe_and_predict(module, hidden_states, routing)
        return routing

    def stats(self) -> dict[str, object]:
        return self.prefetcher.stats()
