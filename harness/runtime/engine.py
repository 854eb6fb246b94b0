"""The offload engine: a real transformers model whose experts come from the packed file through a
bounded expert cache. Loading happens first; the cache is sized afterwards, from what loading measurably
left of the budget."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from harness.cache.book import ExpertCacheBook
from harness.cache.registry import policy_class, policy_factory
from harness.errors import HarnessError
from harness.keys import Scope
from harness.models.loader import load_skeleton_with_experts_replaced
from harness.models.quant import FORMATS
from harness.runtime.expert_cache import ExpertCache
from harness.runtime.offloaded import ExpertMath, ExpertSource, LayerHooks, OffloadedExperts, RoutingSink, StepContext
from harness.store.layout import PackIndex
from harness.store.reader import ExpertReader


def check_live_policy(spec: str) -> None:
    """Refuse policies the live engine cannot run, before anything is loaded."""
    cls = policy_class(spec)
    if cls.needs_future:
        raise HarnessError(f"policy {cls.name!r} reads the future of the trace: it runs in `harness simulate` only")


class OffloadEngine:
    def __init__(
        self,
        model_dir: Path,
        index: PackIndex,
        experts_file: Path,
        dense_file: Path,
        io_engine: str = "auto",
        sink: RoutingSink | None = None,
    ) -> None:
        self.index = index
        self.reader = ExpertReader(experts_file, index, io_engine)  # type: ignore[arg-type]
        self.ctx = StepContext()
        self.modules: list[OffloadedExperts] = []

        def replace(layer: int, original: nn.Module) -> nn.Module:
            quant = FORMATS.get(index.expert_dtype)
            math = ExpertMath(original, index.expert_params, quant, getattr(torch, index.dtype))
            module = OffloadedExperts(layer, index.num_experts, math, None, self.ctx, sink)  # type: ignore[arg-type]
            self.modules.append(module)
            return module

        self.model, self.config = load_skeleton_with_experts_replaced(model_dir, dense_file, index, replace)
        self.experts_file = Path(experts_file)
        # Each MoE layer's router (the module beside the replaced experts), for strategies that apply a
        # later layer's router to an earlier hidden state.
        self.routers: dict[int, nn.Module] = {}
        for module in self.model.modules():
            experts = getattr(module, "experts", None)
            if isinstance(experts, OffloadedExperts) and hasattr(module, "gate"):
                self.routers[experts.layer] = module.gate
        self.cache: ExpertSource | None = None

    def configure_cache(self, slots: int, scope: Scope, policy: str, seed: int, io_threads: int) -> ExpertCache:
        """The plain expert cache (strategy `cache`): `slots` per eviction group under `policy`."""
        check_live_policy(policy)
        book = ExpertCacheBook(self.index.moe_layers, slots, scope, policy_factory(policy, seed=seed))
        cache = ExpertCache(self.index, self.reader, book, io_threads)
        self.use_source(cache, None)
        return cache

    def use_source(self, source: ExpertSource, hooks: LayerHooks | None) -> None:
        """Route every offloaded layer's weights through `source`, with a strategy's `hooks` (or none)."""
        self.cache = source
        for module in self.modules:
            module.cache, module.hooks = source, hooks

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        self.reader.close()
