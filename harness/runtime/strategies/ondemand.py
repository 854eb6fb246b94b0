"""Strategy `on-demand` (OD-MoE-style): no expert cache; every expert is loaded just in time.

Each MoE layer has only top-k staging slots; after a layer computes, its slots are emptied (nothing is
kept for the next token). During decode the experts of layer l+d are predicted and read into its staging
slots while layers l..l+d-1 run. The predictor is OD-MoE's emulative one, a quantised shadow model run
`distance` layers ahead and re-aligned with the real hidden state every token (`shadow-int8`,
`shadow-fp16`; harness.runtime.strategies.shadow), or the later layer's own gate applied to layer l's MoE
input (`gate`, the default). With the shadow, the gate's recall is scored beside it (without reading).
Exact. Arguments: `on-demand:2`, `on-demand:shadow-int8:2`, or `predictor=shadow-fp16,distance=3`; `dense=fp16`
(or int8) sets the precision of the shadow's matrices outside its experts (default `same`: the shadow's, as in
OD-MoE). On the embedded random-init models, whose sharpened attention amplifies small errors, int8 attention costs
most of the int8 shadow's recall: on olmoe-small, distance 2, recall 0.69 with every matrix int8, 0.91 with int8
experts and fp16 elsewhere, 0.96 all fp16 (OD-MoE reports 0.97 for its int8 shadow of a trained Mixtral).
Under a memory budget the shadow's bytes come out of the budget's expert slots; a budget that cannot hold
the shadow and the staging slots is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from harness.runtime.expert_cache import ExpertCache
from harness.runtime.offloaded import OffloadedExperts, Routing
from harness.runtime.strategies.base import (
    CacheRequest,
    Recall,
    Strategy,
    before_attention,
    layer_experts,
    register_strategy,
)
from harness.runtime.strategies.prefetch import GatePrefetcher
from harness.runtime.strategies.shadow import (
    ShadowModel,
    check_unquantized,
    fit_budget,
    parse_dense,
    parse_predictor,
    shadow_expert_bytes,
    slots_of,
    staging_slots,
)

if TYPE_CHECKING:
    from harness.runtime.engine import OffloadEngine
    from harness.store.layout import PackIndex


@register_strategy
class OnDemand(Strategy):
    name = "on-demand"
    forced_scope = "per-layer"
    parameters: ClassVar[dict[str, object]] = {"predictor": "gate", "distance": 1, "dense": "same"}
    uses_spec_policy = False
    positional = "distance"

    @classmethod
    def parse(cls, argument: str | None) -> dict[str, object]:
        """Also 'PREDICTOR' and 'PREDICTOR:DISTANCE' (e.g. 'shadow-int8:2')."""
        head, sep, tail = (argument or "").partition(":")
        if head and "=" not in head and not head.strip().isdigit():
            argument = f"predictor={head.strip()}" + (f",distance={tail}" if sep else "")
        params = super().parse(argument)
        parse_dense(str(params["dense"]), parse_predictor(str(params["predictor"]))[1])  # both refused here if unknown
        return params

    def build(self, engine: OffloadEngine, request: CacheRequest) -> ExpertCache:
        distance = int(self.params["distance"])  # type: ignore[call-overload]
        kind, precision = parse_predictor(str(self.params["predictor"]))
        dense = parse_dense(str(self.params["dense"]), precision)
        # top_k slots per layer: a decode step needs at most k experts, so one prediction's keys fit.
        cache = engine.configure_cache(engine.index.top_k, "per-layer", "lru", request.seed, request.io_threads)
        self.cache = cache
        # With the shadow predicting, the gate is scored only (its reads would compete with the shadow's).
        self.prefetcher = GatePrefetcher(engine, cache, distance, stage=kind == "gate")
        self.shadow: ShadowModel | None = None
        self.deviations = [
            f"staging memory: top_k={engine.index.top_k} slots per MoE layer, whatever the RAM budget (no cache "
            "by design); prefill loads just in time without prediction",
            "single machine: OD-MoE distributes experts over worker nodes; here one SSD serves every load",
        ]
        if kind == "gate":
            self.deviations.insert(
                0, f"predictor: layer l+{distance}'s own gate applied to layer l's MoE input, not OD-MoE's shadow"
            )
            return cache
        self.shadow = ShadowModel(engine, precision, distance, dense)  # type: ignore[arg-type]
        self.recall = Recall()
        self._pending: dict[int, set[int]] = {}
        self.index = engine.index
        self.budgeted, self.budget_slots = request.budgeted, request.budget_slots
        self.staging_slots = staging_slots(self.index)
        # Its KV cache is planned at the run's longest sequence (as large as the model's own).
        planned_bytes = self.shadow.nbytes + request.kv_cache_bytes
        self.shadow_slots = slots_of(planned_bytes, self.index)
        if self.budgeted:
            left = fit_budget(self.index, str(precision), planned_bytes, "weights and KV cache", self.budget_slots)
            budget_line = (
                f"memory budget: the shadow's {self.shadow_slots} expert slots (its weights and its KV cache at the "
                f"longest sequence) come out of the budget's {self.budget_slots}, leaving {left}, of which the "
                f"staging uses {self.staging_slots}"
            )
        else:
            budget_line = "no memory budget: the shadow's memory is beside the expert slots (its bytes in the stats)"
        self.deviations.append(budget_line)
        before_attention(engine, self._before_attention)
        weights = f"weights {precision}" if dense == precision else f"experts {precision}, other matrices {dense}"
        lines = [
            f"predictor: a shadow of every decoder layer ({weights}"
            + (", one scale per output row" if "int8" in (precision, dense) else "")
            + f", dequantised per use), distance {distance} decoder layer(s) ahead, re-aligned at each token's "
            "first MoE layer with the real hidden state there; its own KV cache, filled by one shadow pass over the "
            "prompt"
        ]
        kept = self.shadow.kept_linear
        if kept:
            lines.append(
                f"{len(kept)} linear layer(s) of the shadow with a forward of their own "
                f"({', '.join(sorted(set(kept)))}) keep the model's precision; OD-MoE quantises the whole shadow alike"
            )
        if dense != precision:
            lines.append(
                f"the shadow's matrices outside its experts are {dense}; OD-MoE quantises the whole shadow alike"
            )
        lines.append(
            "the shadow runs on the model's thread (CPU), its compute adds to the token's time; in OD-MoE it runs "
            "on its own device beside the real model"
        )
        self.deviations[:0] = lines
        return cache

    def check_pack(self, index: PackIndex) -> None:
        if parse_predictor(str(self.params["predictor"]))[0] == "shadow":
            check_unquantized(index)

    def check_budget(self, index: PackIndex, budget_slots: int, kv_cache_bytes: int) -> None:
        """The shadow's experts and KV cache, known from the pack's index, must fit the budget with the staging
        slots (the rest of its layers is counted once it is built)."""
        _, precision = parse_predictor(str(self.params["predictor"]))
        if precision is None:
            return
        shadow_bytes = shadow_expert_bytes(index, precision) + kv_cache_bytes
        fit_budget(index, precision, shadow_bytes, "its experts and KV cache alone", budget_slots)

    def _before_attention(self, module: OffloadedExperts, hidden: torch.Tensor, kwargs: dict) -> None:
        ctx, shadow = module.ctx, self.shadow
        assert shadow is not None
        if ctx.phase == "prefill":
            if module.layer == shadow.first:
                shadow.prefill(hidden, kwargs)
            return
        for layer, experts in shadow.advance(ctx.now, module.layer, hidden, kwargs):
            self._pending[layer] = experts
            self.cache.prefetch(layer, sorted(experts), ctx.now, ctx.phase)

    def before_experts(self, module: OffloadedExperts, hidden_states: torch.Tensor, routing: Routing) -> Routing:
        if self.shadow is not None:
            predicted = self._pending.pop(module.layer, None)
            if predicted is not None:
                self.recall.add(predicted, layer_experts(routing.top_k_index))
        self.prefetcher.observe_and_predict(module, hidden_states, routing)
        return routing

    def after_experts(self, module: OffloadedExperts) -> None:
        self.cache.discard_layer(module.layer, module.ctx.now)

    def stats(self) -> dict[str, object]:
        if self.shadow is None:
            return {"predictor": "next-layer gate", **self.prefetcher.stats()}
        self.shadow.note_kv()
        # The shadow's memory is its weights and its own KV cache (as long as the longest sequence).
        shadow_bytes = self.shadow.nbytes + self.shadow.kv_peak_bytes
        used_slots = slots_of(shadow_bytes, self.index) + self.staging_slots
        return {
            "predictor": f"shadow-{self.shadow.precision}",
            "shadow_dense_precision": self.shadow.dense,
            "prediction": self.recall.to_dict(),
            "gate_prediction": self.prefetcher.recall.to_dict(),
            "prefetch": self.cache.prefetch_stats.to_dict(),
            "shadow_bytes": shadow_bytes,
            "shadow_weight_bytes": self.shadow.nbytes,
            "shadow_kv_cache_bytes": self.shadow.kv_peak_bytes,
            "shadow_compute_s_by_phase": dict(self.shadow.compute_s),
            "staging_bytes": self.staging_slots * self.index.stride_bytes,
            "budget_expert_bytes": self.budget_slots * self.index.stride_bytes if self.budgeted else None,
            "budget_expert_slots": self.budget_slots if self.budgeted else None,
            "shadow_slots": self.shadow_slots,
            "expert_slots_left": self.budget_slots - self.shadow_slots if self.budgeted else None,
            # Judged on the measured KV cache; None without a budget (nothing to be within).
            "shadow_and_staging_within_budget": used_slots <= self.budget_slots if self.budgeted else None,
        }
