"""Strategy `fiddler` (Fiddler-style DRAM offloading, Kamahori et al., ICLR 2025).

Fiddler keeps every expert in host DRAM and places the most popular ones (an offline popularity
profile) on the GPU until its memory is full; placement is static. Per layer and expert with n routed
tokens it compares cost_cpu = n * t_cpu_token with cost_gpu = 0 (resident) or t_copy, and computes the
expert on the cheaper side. Here the expert file is memory-mapped, so under the RAM budget the page
cache pages experts in from the SSD (Fiddler's host DRAM).

- With `--device cuda` the devices are real: the popular set is copied to the GPU once placed; an expert
  outside it either computes on the CPU from the mapped file (its hidden rows go to the CPU and its output
  rows come back: only activations cross PCIe) or is copied to the GPU and computes there, as the cost model
  with its constants measured on this machine decides.
- On the CPU (no GPU) the GPU tier becomes pinned RAM slots holding the most popular experts ("static
  popular set pinned in RAM + the rest through the page cache") and every expert computes on the CPU; the
  cost model's decisions are reported, not acted on.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from harness.keys import ExpertKey
from harness.runtime.offloaded import (
    Contribution,
    ExpertMath,
    ExpertWeights,
    OffloadedExperts,
    Routing,
    expert_forward,
)
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


def measure_cost_model(
    math: ExpertMath, weights: ExpertWeights, hidden_size: int, device: torch.device | None = None
) -> CostModel:
    """Time one token through one expert on the CPU, and (computing on a CUDA `device`) one expert's copy
    from where the weights live (the mapped file) to the GPU."""
    x = torch.randn(1, hidden_size, dtype=math.dtype)
    one = torch.ones(1, 1, dtype=x.dtype)
    cpu = []
    for _ in range(TIMING_REPEATS):
        start = time.perf_counter()
        expert_forward(math, weights, x, one)
        cpu.append(time.perf_counter() - start)
    copy = None
    if device is not None and device.type == "cuda":
        copies = []
        for _ in range(TIMING_REPEATS):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            for tensor in weights.values():
                tensor.to(device, non_blocking=False)
            torch.cuda.synchronize(device)
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
        self.executed_on: Counter[str] = Counter()
        """Expert computes per device that ran them (a decision acts only where there is a GPU)."""
        self.device = engine.device
        self.pinned_set = False
        self.profile = "trace " + str(self.params["trace"]) if self.params["trace"] else "first prompt's prefill"
        self.deviations = [
            "cpu-only reduction: no GPU, so the GPU tier is RAM slots pinned with the most popular experts "
            "and every expert computes on the CPU; the rest is read through a memory map of the expert file "
            "(the OS page cache under the RAM budget stands for Fiddler's host DRAM)"
            if self.device.type == "cpu"
            else "the pinned set is copied to the GPU; the rest is read through a memory map of the expert file "
            "(the OS page cache under the RAM budget stands for Fiddler's host DRAM); an expert computed on the "
            "CPU rounds differently from the GPU's kernels, so tokens may differ from a resident GPU model",
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
            first.math, self.source.mapped((first.layer, 0)), engine.config.get_text_config().hidden_size, self.device
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
            side = self.cost_model.side(n, self.source.is_pinned((module.layer, e)))
            self.decisions[side] += 1
            if side == "cpu" and self.device.type != "cpu":
                routing.precomputed[e] = self._on_cpu(module, e, hidden_states, routing)
            self.executed_on["cpu" if side == "cpu" else self.device.type] += 1
        return routing

    def _on_cpu(
        self, module: OffloadedExperts, expert: int, hidden_states: torch.Tensor, routing: Routing
    ) -> Contribution:
        """`expert` computed on the CPU from host memory: its hidden rows go to the CPU, its output rows back."""
        self.source.device_reads.mark(module.ctx.phase)  # the mapped read below belongs to this phase
        token_idx, top_k_pos = torch.where(routing.top_k_index == expert)
        rows = hidden_states[token_idx].to("cpu")
        weights = routing.top_k_weights[token_idx, top_k_pos, None].to("cpu")
        out = expert_forward(module.math, self.source.mapped((module.layer, expert)), rows, weights)
        return token_idx, out.to(hidden_states.device)

    def stats(self) -> dict[str, object]:
        return {
            **super().stats(),
            "cost_model": {
                "t_cpu_token_s": self.cost_model.t_cpu_token_s,
                "t_copy_s": self.cost_model.t_copy_s,
                "t_copy_note": None if self.cost_model.t_copy_s is not None else "no GPU: not measurable",
                "decisions": dict(self.decisions),
                "executed_on": dict(self.executed_on),
            },
        }
