"""Offloaded greedy generation yields exactly the tokens of the fully resident transformers model."""

from __future__ import annotations

import pytest
import torch

from harness.models.loader import reference_model
from harness.models.packer import pack_paths
from harness.runtime.engine import OffloadEngine
from harness.runtime.generation import generate
from harness.store.layout import PackIndex
from tests.conftest import ARCHS

PROMPT = [5, 17, 99, 3, 250, 7, 8, 100, 42, 11]
NEW_TOKENS = 12


def offloaded_tokens(model_dir, slots: int, scope: str = "per-layer", policy: str = "lru") -> tuple[list[int], object]:
    paths = pack_paths(model_dir)
    index = PackIndex.load(paths["index"])
    engine = OffloadEngine(model_dir, index, paths["experts"], paths["dense"])
    cache = engine.configure_cache(slots, scope, policy, seed=0, io_threads=2)
    try:
        log = generate(engine.model, PROMPT, NEW_TOKENS, "greedy", ctx=engine.ctx)
    finally:
        engine.close()
    return log.token_ids, cache


@pytest.mark.parametrize("arch", ARCHS)
def test_offloaded_greedy_matches_resident_model(arch, tiny_model):
    model_dir = tiny_model(arch)
    reference = generate(reference_model(model_dir), PROMPT, NEW_TOKENS, "greedy").token_ids
    index = PackIndex.load(pack_paths(model_dir)["index"])
    # Down to the minimum (top-k slots per layer, so the prefill streams experts), up to all experts.
    for slots in sorted({index.top_k, index.num_experts // 2, index.num_experts}):
        tokens, cache = offloaded_tokens(model_dir, slots)
        assert tokens == reference, f"{arch} with {slots} slots per layer"
        assert cache.book.total().misses > 0
    tokens, _ = offloaded_tokens(model_dir, index.top_k * len(index.moe_layers), scope="global", policy="lfu")
    assert tokens == reference


def test_reference_loop_matches_transformers_generate(tiny_model):
    model = reference_model(tiny_model("olmoe"))
    ours = generate(model, PROMPT, NEW_TOKENS, "greedy").token_ids
    theirs = model.generate(
        torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=model.config.pad_token_id
    )[0, len(PROMPT) :].tolist()
    assert ours == theirs


@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_offloaded_logits_are_bit_identical(arch, tiny_model):
    model_dir = tiny_model(arch)
    paths = pack_paths(model_dir)
    index = PackIndex.load(paths["index"])
    engine = OffloadEngine(model_dir, index, paths["experts"], paths["dense"])
    engine.configure_cache(index.top_k, "per-layer", "lru", seed=0, io_threads=2)
    with torch.inference_mode():
        ours = engine.model(torch.tensor([PROMPT])).logits
        theirs = reference_model(model_dir)(torch.tensor([PROMPT])).logits
    engine.close()
    assert torch.equal(ours, theirs)
