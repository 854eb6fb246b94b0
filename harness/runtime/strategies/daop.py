"""Strategy `daop` (DAOP-style, Zhang et al., DATE 2025). Approximate by design.

- Placement: Fiddler's popularity placement with the fast tier split evenly per layer.
- Sequence-specific allocation: during each prompt's prefill, per layer, the tokens routed to each
  expert are counted; up to `swaps` times the hottest non-resident expert replaces the coldest resident
  one if hot > 1.05 x cold.
- Predictive pre-calculation (decode, from MoE layer `start` on): layer i+1's gate is applied to layer
  i's MoE input; the predicted experts of layer i+1 that are not resident are computed early, on a CPU
  thread, with layer i's hidden state as input, and layer i+1 then uses the predicted routing (its
  resident experts compute with its own input). If no predicted expert is resident, the weakest one is
  replaced by the best-scoring resident expert and the weights renormalised.

The slow tier (host DRAM in DAOP) is the memory-mapped expert file under the page cache, as for
`fiddler`. With `--device cuda` the fast tier is the GPU (the resident set copied to VRAM) and the
pre-calculation runs on the CPU from host memory as in DAOP: layer i's hidden state goes to the CPU and the
predicted experts' outputs come back. On the CPU the fast tier is RAM slots and everything computes on the
CPU. The result reports token agreement with the exact model and the prediction recall.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, ClassVar

import torch

from harness.keys import ExpertKey
from harness.runtime.offloaded import Contribution, OffloadedExperts, Routing, expert_forward
from harness.runtime.strategies.base import (
    CacheRequest,
    GatePredictor,
    Recall,
    layer_experts,
    register_strategy,
)
from harness.runtime.strategies.mapped import MappedExperts, TwoTierStrategy, most_popular, popularity_from_trace

if TYPE_CHECKING:
    from harness.runtime.engine import OffloadEngine

SWAP_MARGIN = 1.05
"""DAOP's swap condition: hot tokens > 1.05 x cold tokens (paper)."""


@register_strategy
class DaopStyle(TwoTierStrategy):
    name = "daop"
    exact = False
    forced_scope = "per-layer"
    parameters: ClassVar[dict[str, object]] = {"trace": None, "pin": 0.5, "swaps": 8, "start": 5}
    uses_spec_policy = False
    positional = "trace"

    def build(self, engine: OffloadEngine, request: CacheRequest) -> MappedExperts:
        self.index, self.gates = engine.index, GatePredictor(engine)
        self.math = {m.layer: m.math for m in engine.modules}
        self._two_tiers(engine, request.slots, "per-layer")
        self.recall = Recall()
        self.swaps_done = 0
        self.fallbacks = 0
        self.precomputed = 0
        self._placed: set[int] = set()
        self._precalc: dict[int, tuple[Routing, Future[dict[int, Contribution]]]] = {}
        self._pending_recall: dict[int, set[int]] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="daop-precalc")
        self.device = engine.device
        self.deviations = [
            "no GPU: the RAM-resident set (pinned slots) stands for the GPU-resident set, the memory-mapped expert "
            "file under the page cache for host DRAM; every expert computes on the CPU"
            if self.device.type == "cpu"
            else "the resident set is copied to the GPU; the memory-mapped expert file under the page cache stands "
            "for host DRAM; pre-calculation computes on the CPU",
            f"fast tier: {float(self.params['pin']):.0%} of the budget's expert memory, "
            f"{self.source.book.capacity} experts per layer; leftover slots are "
            "not assigned by global popularity (equal slots per layer)",
            f"top-{engine.index.top_k} generalisation of the top-2 fallback: if none of the predicted experts is "
            "resident, the weakest is replaced by the best-scoring resident one and the weights rescaled to the "
            "router's original sum",
            f"pre-calculation from MoE layer position {self.params['start']} on (layer i predicts i+1 for i >= start)",
            "swaps happen at each layer's prefill step, before it computes",
        ]
        if self.params["trace"]:
            counts = popularity_from_trace(str(self.params["trace"]), engine.index)
            for layer in engine.index.moe_layers:
                self._place_layer(layer, counts, 0)
            self.profile = f"trace {self.params['trace']}"
        else:
            self.profile = "first prompt's prefill (per layer, before that layer computes)"
            self.deviations.append(
                "no popularity profile given: each layer's placement comes from the prefill "
                "routing of the run's first prompt"
            )
        return self.source

    def _place_layer(self, layer: int, counts: dict[ExpertKey, int], now: int) -> None:
        keys = [(layer, e) for e in range(self.index.num_experts)]
        for key in most_popular(counts, keys, self.source.book.capacity):
            self.source.pin(key, now, "prefill")
        self._placed.add(layer)

    def _swap(self, layer: int, tokens: Counter[int], now: int) -> None:
        """Sequence-specific allocation: up to `swaps` hot-for-cold exchanges in `layer`."""
        for _ in range(int(self.params["swaps"])):  # type: ignore[call-overload]
            resident = [e for e in range(self.index.num_experts) if self.source.is_pinned((layer, e))]
            outside = [e for e in tokens if not self.source.is_pinned((layer, e))]
            if not resident or not outside:
                return
            hot = max(outside, key=lambda e: (tokens[e], -e))
            cold = min(resident, key=lambda e: (tokens[e], e))
            if not tokens[hot] > SWAP_MARGIN * tokens[cold]:
                return
            self.source.unpin((layer, cold), now)
            self.source.pin((layer, hot), now, "prefill")
            self.swaps_done += 1

    def _predict(self, target: int, hidden_states: torch.Tensor) -> Routing:
        """Layer `target`'s routing predicted from this hidden state, with the all-non-resident fallback."""
        logits, weights, index = self.gates.predict(target, hidden_states)
        self._pending_recall[target] = layer_experts(index)
        pinned = [e for e in range(self.index.num_experts) if self.source.is_pinned((target, e))]
        if pinned and not any(self.source.is_pinned((target, e)) for e in index[0].tolist()):
            self.fallbacks += 1
            best = max(pinned, key=lambda e: float(logits[0, e]))
            weakest = int(torch.argmin(weights[0]))
            total = weights.sum(dim=-1, keepdim=True)
            index, weights = index.clone(), weights.clone()
            index[0, weakest] = best
            weights[0, weakest] = torch.softmax(logits[0].float(), dim=-1)[best].to(weights.dtype)
            weights = weights * (total / weights.sum(dim=-1, keepdim=True))
        return Routing(index, weights)

    def _precompute(self, target: int, hidden_states: torch.Tensor, routing: Routing) -> dict[int, Contribution]:
        """Layer `target`'s non-resident predicted experts on `hidden_states`, computed on the CPU from host
        memory (runs on the pre-calc thread; with a GPU the hidden state comes to the CPU here)."""
        out: dict[int, Contribution] = {}
        rows = torch.zeros(1, dtype=torch.long)
        with torch.inference_mode():
            hidden_cpu, weights_cpu = hidden_states.to("cpu"), routing.top_k_weights.to("cpu")
            for pos, expert in enumerate(routing.top_k_index[0].tolist()):
                if self.source.is_pinned((target, expert)):
                    continue
                weights = self.source.mapped((target, expert))
                out[expert] = (rows, expert_forward(self.math[target], weights, hidden_cpu, weights_cpu[:, pos, None]))
        return out

    def _prefill(self, layer: int, routing: Routing, now: int) -> None:
        tokens = Counter(routing.top_k_index.reshape(-1).tolist())
        if layer in self._placed:
            self._swap(layer, tokens, now)
        else:
            self._place_layer(layer, {(layer, e): n for e, n in tokens.items()}, now)

    def before_experts(self, module: OffloadedExperts, hidden_states: torch.Tensor, routing: Routing) -> Routing:
        layer, ctx = module.layer, module.ctx
        if ctx.phase == "prefill":
            self._prefill(layer, routing, ctx.now)
            return routing
        predicted_set = self._pending_recall.pop(layer, None)
        if predicted_set is not None:
            self.recall.add(predicted_set, layer_experts(routing.top_k_index))
        used = routing
        job = self._precalc.pop(layer, None)
        if job is not None:
            predicted, future = job
            # The outputs computed on the CPU come back to the device the layer computes on.
            done = {e: (rows.to(self.device), out.to(self.device)) for e, (rows, out) in future.result().items()}
            used = Routing(predicted.top_k_index, predicted.top_k_weights, done)
            self.precomputed += len(used.precomputed)
        target = self.gates.target(layer)
        start = int(self.params["start"])  # type: ignore[call-overload]
        if self.approximate and target is not None and self.gates.position(layer) >= start:
            predicted = self._predict(target, hidden_states)
            future = self._executor.submit(self._precompute, target, hidden_states, predicted)
            self._precalc[target] = (predicted, future)
        return used

    def stats(self) -> dict[str, object]:
        return {
            **super().stats(),
            "prediction": self.recall.to_dict(),
            "swaps": self.swaps_done,
            "fallbacks": self.fallbacks,
            "precomputed_experts": self.precomputed,
        }
