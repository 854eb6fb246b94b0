"""LRU: evict the resident expert whose last access is oldest."""

from __future__ import annotations

from harness.cache.ranked import RecencyPolicy
from harness.cache.registry import register_policy


@register_policy
class LRU(RecencyPolicy):
    """The least recently touched (hit or insert) leaves first: a recency queue. Within one step the hits, by
    expert id, are touched before the misses are inserted, by expert id. Compiled replay (`ranked`)."""

    name = "lru"
