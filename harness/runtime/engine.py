"""The offload engine: a real transformers model whose experts come from the packed file through a
bounded expert cache. Loading happens first; the cache is sized afterwards, from what loading measurably
left of the budget."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from harness.cache.book import ExpertCacheBook
from harness.cache.registry import policy_class, policy_factory
from harness.cache.tiers import TierSpec
from harness.errors import HarnessError
from harness.keys import Scope
from harness.models.loader import load_skeleton_with_experts_replaced
from harness.models.quant import FORMATS
from harness.models.routers import Router, layer_routers
from harness.runtime.device import DeviceTimeline
from harness.runtime.expert_cache import ExpertCache
from harness.runtime.expert_io import BackendName, ReadBackend, ThreadReads, make_backend, queue_depth_from_profile
from harness.runtime.offloaded import ExpertMath, ExpertSource, LayerHooks, OffloadedExperts, RoutingSink, StepContext
from harness.runtime.tiered_cache import TieredExperts
from harness.ssd.readtime import load_profile_for_path
from harness.store.layout import PackIndex
from harness.store.pagecache import PageCacheReader
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
        io_backend: BackendName = "auto",
        device: str = "cpu",
        io_depth: int | None = None,
    ) -> None:
        self.index = index
        self.device = torch.device(device)
        """Where the non-expert weights, the hidden states and so the experts' compute live."""
        self.reader = ExpertReader(experts_file, index, io_engine)  # type: ignore[arg-type]
        self.io_backend: BackendName = io_backend
        self.io_depth = io_depth
        """Expert reads in flight as given (RunSpec.io_depth), or None: from the disk's SSD profile."""
        self.io: ReadBackend | None = None
        self.io_info: dict[str, object] | None = None
        """How expert reads are issued (backend, queue depth and where it came from); None until used."""
        self.ctx = StepContext()
        self.modules: list[OffloadedExperts] = []

        def replace(layer: int, original: nn.Module) -> nn.Module:
            quant = FORMATS.get(index.expert_dtype)
            math = ExpertMath(original, index.expert_params, quant, getattr(torch, index.dtype))
            module = OffloadedExperts(layer, index.num_experts, math, None, self.ctx, sink)  # type: ignore[arg-type]
            self.modules.append(module)
            return module

        self.model, self.config = load_skeleton_with_experts_replaced(model_dir, dense_file, index, replace)
        if self.device.type != "cpu":
            self.model.to(self.device)  # the offloaded experts hold no parameters: their weights stay in the source
        self.experts_file = Path(experts_file)
        self.model_dir, self.dense_file = Path(model_dir), Path(dense_file)
        self.cache: ExpertSource | None = None

    @cached_property
    def routers(self) -> dict[int, Router]:
        """Each MoE layer's router, for strategies that apply a later layer's router to an earlier hidden state
        (found on first use: a HarnessError says why where one cannot be applied)."""
        return layer_routers(self.model, {m.layer: m for m in self.modules}, self.index.num_experts)

    def configure_cache(self, slots: int, scope: Scope, policy: str, seed: int, io_threads: int) -> ExpertCache:
        """The plain expert cache (strategy `cache`): `slots` per eviction group under `policy`."""
        check_live_policy(policy)
        book = ExpertCacheBook(self.index.moe_layers, slots, scope, policy_factory(policy, seed=seed))
        cache = ExpertCache(self.index, self.read_backend(io_threads), book, io_threads)
        self.use_source(cache, None)
        return cache

    def configure_tiers(
        self, tiers: Sequence[TierSpec], scope: Scope, seed: int, io_threads: int, device: str = "cpu"
    ) -> TieredExperts:
        """A tier stack (harness.cache.tiers) instead of one cache. With a page-cache tier the expert file is
        read buffered through the page cache, each read classified (`PageCacheReader`), by threads: io_uring
        reads would bypass the classification."""
        for tier in tiers:
            if not tier.modelled:
                check_live_policy(tier.policy)
        if any(t.modelled for t in tiers):
            self.reader.close()
            self.reader = PageCacheReader(self.experts_file, self.index)
            self.io = ThreadReads(self.reader, io_threads)
            self.io_info = {
                "backend": self.io.name,
                "requested": self.io_backend,
                "fallback_reason": "a page-cache tier: buffered reads classified with RWF_NOWAIT, by threads",
                "queue_depth": io_threads,
                "queue_depth_how": f"io_threads {io_threads}",
                "read_end_time": "timed by the reading thread",
            }
        source = TieredExperts(self.index, tiers, scope, seed, self.read_backend(io_threads), io_threads, device)
        self.use_source(source, None)
        return source

    def read_backend(self, io_threads: int) -> ReadBackend:
        """The backend expert reads go through (made once): io_uring where usable, else threads, with the
        queue depth given (`io_depth`), else from this disk's SSD profile, else `io_threads`."""
        if self.io is None:
            if self.io_depth is not None:
                depth, how = self.io_depth, f"given: io_depth {self.io_depth}"
            else:
                depth, how = queue_depth_from_profile(
                    load_profile_for_path(self.experts_file), self.index.stride_bytes, io_threads
                )
            self.io, fallback = make_backend(self.reader, self.io_backend, depth)
            self.io_info = {
                "backend": self.io.name,
                "requested": self.io_backend,
                "fallback_reason": fallback,
                "queue_depth": depth,
                "queue_depth_how": how,
                "read_end_time": "seen by the ring's own thread as the completion wakes it"
                if self.io.name == "io_uring"
                else "timed by the reading thread",
            }
        return self.io

    def time_device(self, timeline: DeviceTimeline | None) -> None:
        """Time every expert's copy and compute on the device (CUDA runs) in `timeline`; None stops timing."""
        for module in self.modules:
            module.math.timeline = timeline

    def use_source(self, source: ExpertSource, hooks: LayerHooks | None) -> None:
        """Route every offloaded layer's weights through `source`, with a strategy's `hooks` (or none)."""
        self.cache = source
        for module in self.modules:
            module.cache, module.hooks = source, hooks

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        if self.io is not None:
            self.io.close()
        self.reader.close()
