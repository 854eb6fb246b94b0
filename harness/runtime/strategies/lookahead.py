"""Strategies `lookahead` and `lookahead+gate`: predict a layer's experts before its attention block runs.

When decoder layer l starts, its own router is applied to its input (the residual stream, normalised by
the layer's post-attention norm as the router's real input is): the predicted experts are staged in the
cache and read in the background while attention runs. The residual stream changes little across one
attention block, so the prediction is close to the routing the layer then computes. `lookahead+gate`
adds the next-layer gate of `prefetch` (layer l+1's router on layer l's MoE input, read during layer
l's experts; `distance=d`: layer l+d's). Exact: the model computes with its own routing; a mispredicted
expert is a demand read.

With `prefill=1` (default) both predictions also run during prefill, over all the prompt's tokens, so a
long prompt's experts are read in the order the layers need them, layer l+1's reads overlapping layer
l's compute. Recall is scored on decode steps, on the whole prediction. With `top=N` below k only each token's N
heaviest predicted experts are read (`likely_experts`): where the disk is the limit, a prefetch that is not
used costs its read, and the lighter predictions are the ones most often wrong. With N above k the prediction is
widened to each token's N likeliest experts (its k and the next highest router logits), all read and scored: a
higher recall for more bytes, for a disk with time to spare.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from harness.keys import Phase
from harness.runtime.expert_cache import ExpertCache
from harness.runtime.offloaded import OffloadedExperts, Routing
from harness.runtime.strategies.base import (
    CacheRequest,
    GatePredictor,
    Recall,
    Strategy,
    before_attention,
    layer_experts,
    moe_input_norm,
    prediction_reads,
    register_strategy,
    top_deviations,
)
from harness.runtime.strategies.prefetch import GatePrefetcher

if TYPE_CHECKING:
    from harness.runtime.engine import OffloadEngine


@register_strategy
class LookAhead(Strategy):
    name = "lookahead"
    parameters: ClassVar[dict[str, object]] = {"prefill": 1, "top": 0}

    def build(self, engine: OffloadEngine, request: CacheRequest) -> ExpertCache:
        cache = engine.configure_cache(request.slots, request.scope, request.policy, request.seed, request.io_threads)
        self.cache = cache
        self.phases: tuple[Phase, ...] = ("prefill", "decode") if int(self.params["prefill"]) else ("decode",)  # type: ignore[call-overload]
        self.predictor = GatePredictor(engine)
        self.recall = Recall()
        self.combined = Recall()
        self._pending: dict[int, set[int]] = {}
        self.top = int(self.params["top"])  # type: ignore[call-overload]
        self.gate = (
            GatePrefetcher(engine, cache, int(self.params["distance"]), self.phases, top=self.top)  # type: ignore[call-overload]
            if "distance" in self.params
            else None
        )
        before_attention(engine, self._before_attention)
        self._norms = {m.layer: moe_input_norm(engine, m.layer) for m in engine.modules}
        self.deviations = [
            "the look-ahead applies layer l's router to layer l's input after the post-attention norm (the "
            "router's own input normalisation), before the attention block runs",
            "a prefetched expert is staged outside the policy until used; one its layer's step does not use is "
            "dropped (counted as wasted)",
            *top_deviations(self.top, engine.index.top_k, engine.index.num_experts),
        ]
        return cache

    def _before_attention(self, module: OffloadedExperts, hidden: torch.Tensor, kwargs: dict) -> None:
        ctx = module.ctx
        if ctx.phase not in self.phases:
            return
        normed = self._norms[module.layer](hidden).reshape(-1, hidden.shape[-1])
        logits, weights, indices = self.predictor.predict(module.layer, normed)
        predicted, staged, protect = prediction_reads(module.layer, logits, weights, indices, self.top)
        if ctx.phase == "decode":
            self._pending[module.layer] = predicted
        self.cache.prefetch(module.layer, staged, ctx.now, ctx.phase, protect)

    def before_experts(self, module: OffloadedExperts, hidden_states: torch.Tensor, routing: Routing) -> Routing:
        predicted = self._pending.pop(module.layer, None)
        if predicted is not None:
            actual = layer_experts(routing.top_k_index)
            self.recall.add(predicted, actual)
            gate = self.gate.predicted_for(module.layer) if self.gate is not None else set()
            self.combined.add(predicted | gate, actual)
        if self.gate is not None:
            self.gate.observe_and_predict(module, hidden_states, routing)
        return routing

    def stats(self) -> dict[str, object]:
        out: dict[str, object] = {
            "prediction": self.recall.to_dict(),
            "prefetch": self.cache.prefetch_stats.to_dict(),
        }
        if self.gate is not None:
            out["gate_prediction"] = self.gate.recall.to_dict()
            out["combined_prediction"] = self.combined.to_dict()
        return out


@register_strategy
class LookAheadGate(LookAhead):
    name = "lookahead+gate"
    parameters: ClassVar[dict[str, object]] = {**LookAhead.parameters, "distance": 1}
