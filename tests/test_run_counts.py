"""A run's hit and miss counts and SSD bytes equal hand-computed values for a fixed routing sequence."""

from __future__ import annotations

import torch

from harness.models.packer import pack_paths
from harness.runtime.engine import OffloadEngine
from harness.runtime.generation import generate
from harness.runtime.offloaded import OffloadedExperts
from harness.store.layout import PackIndex

# One expert pair per forward pass (prefill of a 1-token prompt, then 4 decode steps), every layer.
ROUTING = [[0, 1], [2, 3], [0, 1], [1, 2], [1, 3]]


class ScriptedRouter(torch.nn.Module):
    """Replaces a layer's router: returns the next entry of ROUTING with equal weights."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, hidden_states: torch.Tensor):
        experts = torch.tensor([ROUTING[self.calls]] * hidden_states.reshape(-1, hidden_states.shape[-1]).shape[0])
        self.calls += 1
        weights = torch.full(experts.shape, 0.5, dtype=hidden_states.dtype)
        return None, weights, experts


def test_lru_counts_by_hand(tiny_model):
    model_dir = tiny_model("olmoe")
    paths = pack_paths(model_dir)
    index = PackIndex.load(paths["index"])
    engine = OffloadEngine(model_dir, index, paths["experts"], paths["dense"])
    blocks = [m for m in engine.model.modules() if isinstance(getattr(m, "experts", None), OffloadedExperts)]
    assert len(blocks) == len(index.moe_layers)
    for block in blocks:
        block.gate = ScriptedRouter()
    cache = engine.configure_cache(2, "per-layer", "lru", seed=0, io_threads=2)
    generate(engine.model, [7], len(ROUTING), "greedy", ctx=engine.ctx)
    engine.close()
    # LRU, 2 slots: [0,1] 2 misses; [2,3] 2 misses (evict 0, 1); [0,1] 2 misses (evict 2, 3);
    # [1,2] 1 hit + 1 miss (evict 0); [1,3] 1 hit + 1 miss (evict 2). Prefill is the first step.
    for layer in index.moe_layers:
        assert (cache.book.counts["prefill"][layer].hits, cache.book.counts["prefill"][layer].misses) == (0, 2)
        assert (cache.book.counts["decode"][layer].hits, cache.book.counts["decode"][layer].misses) == (2, 6)
    layers = len(index.moe_layers)
    assert len(cache.stats.records) == 8 * layers
    assert cache.stats.bytes_by_phase == {
        "prefill": 2 * layers * index.stride_bytes,
        "decode": 6 * layers * index.stride_bytes,
    }
    assert cache.book.resident_keys() == {(layer, e) for layer in index.moe_layers for e in (1, 3)}
