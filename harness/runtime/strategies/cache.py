"""Strategy `cache`: the expert cache and its eviction policy alone (no prefetcher, no placement planner)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.runtime.expert_cache import ExpertCache
from harness.runtime.strategies.base import CacheRequest, Strategy, register_strategy

if TYPE_CHECKING:
    from harness.runtime.engine import OffloadEngine


@register_strategy
class PlainCache(Strategy):
    name = "cache"
    has_hooks = False

    def build(self, engine: OffloadEngine, request: CacheRequest) -> ExpertCache:
        return engine.configure_cache(request.slots, request.scope, request.policy, request.seed, request.io_threads)
