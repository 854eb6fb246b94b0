"""Strategy `fiddler` (Fiddler-style DRAM offloading, Kamahori et al., ICLR 2025), CPU-only reduction.

Fiddler keeps every expert in host DRAM and places the most popular ones (an offline popularity
profile) on the GPU until its memory is full; placement is static. Per layer and expert with n routed
tokens it compares cost_cpu = n * t_cpu_token with cost_gpu = 0 (resident) or t_copy, and computes the
expert on the cheaper side. Here the expert file is memory-mapped, so under the RAM budget the page
cache pages experts in from the SSD; with no GPU the GPU tier becomes pinned RAM slots holding the most
popular experts ("static popular set pinned in RAM + the rest through the page cache"), and every
expert computes on the CPU. The cost model is kept with measured constants and reported.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from harness.keys import ExpertKey
from harness.runtime.offloaded import ExpertMath, ExpertWeights, OffloadedExperts, Routing, expert_forward
from harness.runtime.strategies.base import CacheRequest, register_strategy
from harness.runtime.strategies.mapped import MappedExperts, TwoTierStrategy, most_popular, popularity_from_trace

if TYPE_CHECKING:
    from harness.runtime.engine import OffloadEngine

TIMING_REPEATS = 5
"""Timed repetitions per cost-model constant; the median is kept."""


@dataclass(frozen=True)
class CostModel:
    """Fiddler's placement decision with constants measured on this machine (seconds)."""

    t_cpu_token_s: float
    """One token through one expert on the CPU."""
    t_copy_s: float | None
    """Copying one expert's weights to the GPU; None without a GPU."""

    def side(self, tokens: int, resident: bool) -> str:
        """'gpu' or 'cpu' for an expert with `tokens` routed tokens."""
        if resident:
            return "gpu"
        if self.t_copy_s is None:
            return "cpu"
        return "gpu" if self.t_copy_s < tokens * self.t_cpu_token_s else "cpu"


def measure_cost_model(math: ExpertMath, weights: ExpertWeights, hidden_size: int) -> CostModel:
    """Time one token through one expert on the CPU, and (with CUDA) one expert's host-to-GPU copy."""
    x = torch.randn(1, hidden_size, dtype=math.dtype)
    one = torch.ones(1, 1, dtype=x.dtype)
    cpu = []
    for _ in range(TIMING_REPEATS):
        start = time.perf_counter()
        expert_forward(math, weights, x, one)
        cpu.append(time.perf_counter() - start)
    copy = None
    if torch.cuda.is_available():
        copies = []
        for _ in range(TIMING_REPEATS):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for tensor in weights.values():
                tensor.to("cuda", non_blocking=False)
            torch.cuda.synchronize()
            copies.append(time.perf_counter() - start)
        copy = statistics.median(copies)
    return CostModel(statistics.median(cpu), copy)


@register_strategy
class FiddlerStyle(TwoTierStrategy):
    name = "fiddler"
    forced_scope = "global"
    parameters: ClassVar[dict[str, object]] = {"trace": None, "pin": 0.5}
    uses_spec_policy = False
    positional = "trace"

    def build(self, engine: OffloadEngine, request: CacheRequest) -> MappedExperts:
        self.index = engine.index
        self._two_tiers(engine, request.slots, "global")
        self._prefill_counts: Counter[ExpertKey] = Counter()
        self.decisions: Counter[str] = Counter()
        self.pinned_set = False
        self.profile = "trace " + str(self.params["trace"]) if self.params["trace"] else "first prompt's prefill"
        self.deviations = [
            "cpu-only reduction: no GPU, so the GPU tier is RAM slots pinned with the most popular experts "
            "and every expert computes on the CPU; the rest is read through a memory map of the expert file "
            "(the OS page cache under the RAM budget stands for Fiddler's host DRAM)",
            f"pinned tier: {float(self.params['pin']):.0%} of the budget's expert memory "
            f"({self.source.book.capacity} experts); the rest is left to the "
            "page cache (a harness choice: Fiddler's DRAM holds every expert)",
            "mapped file advised MADV_RANDOM (no read-around) and MADV_WILLNEED per needed expert",
        ]
        if self.params["trace"]:
            self._pin_popular(popularity_from_trace(str(self.params["trace"]), engine.index), 0)
        else:
            self.deviations.append(
                "no popularity profile given: popularity from the prefill of the run's first prompt, which ran "
                "with nothing pinned; the pinned set is read when the first decode step starts"
            )
        first = engine.modules[0]
        self.cost_model = measure_cost_model(
            first.math, self.source.mapped((first.layer, 0)), engine.config.hidden_size
        )
        return self.source

    def _pin_popular(self, counts: dict[ExpertKey, int], now: int) -> None:
        keys = [(e.layer, e.expert) for e in self.index.entries]
        for key in most_popular(counts, keys, self.source.book.total_slots):
            self.source.pin(key, now, "prefill")
        self.pinned_set = True

    def before_experts(self, module: OffloadedExperts, hidden_states: torch.Tensor, routing: Routing) -> Routing:
        ctx = module.ctx
        if not self.pinned_set:
            if ctx.phase == "prefill":
                experts, tokens = torch.unique(routing.top_k_index, return_counts=True)
                for e, n in zip(experts.tolist(), tokens.tolist(), strict=True):
                    self._prefill_counts[(module.layer, e)] += n
            else:
                self._pin_popular(self._prefill_counts, ctx.now)
        experts, tokens = torch.unique(routing.top_k_index, return_counts=True)
        for e, n in zip(experts.tolist(), tokens.tolist(), strict=True):
            self.decisions[self.cost_model.side(n, self.source.is_pinned((module.layer, e)))] += 1
        return routing

    def stats(self) -> dict[str, object]:
        return {
            **super().stats(),
            "cost_model": {
                "t_cpu_token_s": self.cost_model.t_cpu_token_s,
                "t_copy_s": self.cost_model.t_copy_s,
                "t_copy_note": None if self.cost_model.t_copy_s is not None else "no GPU: not measurable",
                "decisions": dict(self.decisions),
            },
        }
