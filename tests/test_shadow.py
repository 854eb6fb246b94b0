"""OD-MoE's shadow predictor in `on-demand`: exact tokens, recall scored beside the gate's, its memory
reported, argument forms, and the int8 quantisation within half a step of the weights."""

from __future__ import annotations

import pytest
import torch

from harness.errors import HarnessError
from harness.models.loader import reference_model
from harness.models.packer import pack_paths
from harness.runtime.generation import generate
from harness.runtime.strategies import make_strategy
from harness.runtime.strategies.shadow import dequantize, quantize
from harness.store.layout import PackIndex
from tests.test_strategies import NEW_TOKENS, PROMPT, strategy_tokens


@pytest.mark.parametrize("arch", ["olmoe", "mixtral"])
def test_shadow_on_demand_matches_resident_model(arch, tiny_model):
    model_dir = tiny_model(arch)
    reference = generate(reference_model(model_dir), PROMPT, NEW_TOKENS, "greedy").token_ids
    index = PackIndex.load(pack_paths(model_dir)["index"])
    layers = len(index.moe_layers)
    recalls = {}
    for spec in ("on-demand:shadow-int8:1", "on-demand:shadow-fp16:1"):
        tokens, strategy, cache = strategy_tokens(model_dir, spec, index.num_experts)
        assert tokens == reference, f"{arch} {spec}"
        stats = strategy.stats()
        # The shadow predicts every MoE layer of every decode step; the gate (scored only) all but the first.
        assert stats["prediction"]["predictions"] == (NEW_TOKENS - 1) * layers
        assert stats["gate_prediction"]["predictions"] == (NEW_TOKENS - 1) * (layers - 1)
        assert stats["shadow_compute_s_by_phase"]["decode"] > 0
        assert stats["staging_bytes"] == index.top_k * layers * index.stride_bytes
        # Its memory is its weights and its own KV cache: keys and values of every decoder layer for the prompt
        # and each decode step (the last token's are never needed: the sequence ends).
        config = strategy.shadow.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # float32
        assert stats["shadow_kv_cache_bytes"] == (len(PROMPT) + NEW_TOKENS - 1) * kv_per_token
        assert stats["shadow_bytes"] == stats["shadow_weight_bytes"] + stats["shadow_kv_cache_bytes"]
        pf = stats["prefetch"]
        assert pf["issued"] == pf["used"] + pf["wasted"] + pf["cancelled"]
        assert cache.book.total("decode").hits == pf["used"]
        recalls[spec] = stats["prediction"]["recall"]
        if arch == "olmoe":  # on this model the shadow runs ahead of the gate
            assert stats["prediction"]["recall"] > stats["gate_prediction"]["recall"]
    assert recalls["on-demand:shadow-fp16:1"] >= recalls["on-demand:shadow-int8:1"] > 0.8


def test_on_demand_arguments():
    assert make_strategy("on-demand:shadow-int8:2").params == {"predictor": "shadow-int8", "distance": 2}
    assert make_strategy("on-demand:shadow-fp16").params == {"predictor": "shadow-fp16", "distance": 1}
    assert make_strategy("on-demand:3").params == {"predictor": "gate", "distance": 3}
    assert make_strategy("on-demand:predictor=shadow-int8,distance=2").params["distance"] == 2
    with pytest.raises(HarnessError, match="unknown predictor"):
        make_strategy("on-demand:shadow-int4")


def test_int8_quantisation_within_half_a_step_and_the_scale_rounding():
    weight = torch.randn(16, 32, dtype=torch.bfloat16)
    stored, scale = quantize(weight, "int8")
    assert stored.dtype == torch.int8 and scale.shape == (16, 1)
    error = (dequantize(stored, scale, torch.float32) - weight.float()).abs()
    # Half a step, plus the scale's own fp16 rounding (2**-11 relative) times at most 127 steps.
    assert bool((error <= scale.float() * (0.5 + 127 * 2**-11) * 1.001).all())
