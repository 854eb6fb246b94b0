"""OD-MoE's shadow predictor in `on-demand`: exact tokens, recall scored beside the gate's, its memory
reported and taken out of a budget's expert slots, argument forms, and the int8 quantisation within half a
step of the weights."""

from __future__ import annotations

import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from harness.errors import HarnessError
from harness.models.adapters import load_config
from harness.models.loader import reference_model
from harness.models.packer import pack_model, pack_paths
from harness.run import execute, resolve_slots
from harness.runtime.generation import generate
from harness.runtime.strategies import CacheRequest, make_strategy
from harness.runtime.strategies.shadow import (
    QuantLinear,
    cache_tensors,
    dequantize,
    fit_budget,
    quantize,
    shadow_expert_bytes,
)
from harness.spec import RunSpec
from harness.store.layout import PackIndex
from tests.test_strategies import NEW_TOKENS, PROMPT, strategy_tokens


def _kv_bytes_per_token(config) -> int:
    """The shadow's float32 KV cache per token: keys and values of every decoder layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4


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
        kv_per_token = _kv_bytes_per_token(strategy.shadow.config)
        assert stats["shadow_kv_cache_bytes"] == (len(PROMPT) + NEW_TOKENS - 1) * kv_per_token
        assert stats["shadow_bytes"] == stats["shadow_weight_bytes"] + stats["shadow_kv_cache_bytes"]
        pf = stats["prefetch"]
        assert pf["issued"] == pf["used"] + pf["wasted"] + pf["cancelled"]
        assert cache.book.total("decode").hits == pf["used"]
        recalls[spec] = stats["prediction"]["recall"]
        if arch == "olmoe":  # on this model the shadow runs ahead of the gate
            assert stats["prediction"]["recall"] > stats["gate_prediction"]["recall"]
    assert recalls["on-demand:shadow-fp16:1"] >= recalls["on-demand:shadow-int8:1"] > 0.8


@pytest.mark.parametrize("arch", ["phimoe", "hunyuan_v1_moe", "minimax", "deepseek_v32", "hy_v4", "deepseek_v4"])
def test_shadow_runs_linear_subclasses_weight_readers_and_own_caches(arch, tiny_model):
    """Phi-3.5-MoE's router is a linear layer with a forward of its own (kept at the model's precision); Hunyuan's
    code and the DSA indexers read a projection's `weight`; MiniMax keeps its linear-attention state in a cache
    class of its own; DeepSeek-V4's layers get the real model's cache as past_key_values beside the shadow's. Each
    failed before: the shadow's tokens are the resident model's."""
    model_dir = tiny_model(arch)
    reference = generate(reference_model(model_dir), PROMPT, NEW_TOKENS, "greedy").token_ids
    index = PackIndex.load(pack_paths(model_dir)["index"])
    tokens, strategy, _ = strategy_tokens(model_dir, "on-demand:shadow-int8:1", index.num_experts)
    assert tokens == reference
    assert strategy.stats()["prediction"]["predictions"] == (NEW_TOKENS - 1) * len(index.moe_layers)
    shadow = strategy.shadow
    held = {id(t) for t in cache_tensors(shadow.kv)}
    for layer in shadow.kv.layers:  # keys and values are counted, and for MiniMax its linear-attention state too
        assert all(id(t) in held for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))
    if arch == "minimax":
        assert type(shadow.kv).__name__ == "MiniMaxCache"
        linear = [t for t in shadow.kv.linear_cache if isinstance(t, torch.Tensor)]
        assert linear and all(id(t) in held for t in linear)
    if arch == "phimoe":
        routers = [m for layer in shadow.layers for m in layer.modules() if type(m).__name__ == "PhimoeTopKRouter"]
        assert routers and not any(isinstance(m, QuantLinear) for m in routers)
        kept = f"{len(routers)} linear layer(s) of the shadow with a forward of their own (PhimoeTopKRouter)"
        assert any(line.startswith(kept) for line in strategy.deviations), strategy.deviations


def test_shadow_kv_bytes_count_linear_attention_states(tiny_model):
    # Qwen3-Next's gated DeltaNet layers keep a convolution and a recurrent state per layer, no keys or values.
    model_dir = tiny_model("qwen3_next")
    index = PackIndex.load(pack_paths(model_dir)["index"])
    _, strategy, _ = strategy_tokens(model_dir, "on-demand:shadow-int8:1", index.num_experts)
    layers = strategy.shadow.kv.layers

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    keys_values = nbytes(t for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None)))
    states = nbytes(
        t for layer in layers for name in ("conv_states", "recurrent_states") for t in getattr(layer, name, {}).values()
    )
    assert keys_values > 0 and states > 0
    assert strategy.shadow.kv_bytes() == keys_values + states


def test_on_demand_arguments():
    assert make_strategy("on-demand:shadow-int8:2").params == {
        "predictor": "shadow-int8",
        "distance": 2,
        "dense": "same",
    }
    assert make_strategy("on-demand:shadow-fp16").params == {"predictor": "shadow-fp16", "distance": 1, "dense": "same"}
    assert make_strategy("on-demand:3").params == {"predictor": "gate", "distance": 3, "dense": "same"}
    assert make_strategy("on-demand:predictor=shadow-int8,distance=2").params["distance"] == 2
    assert make_strategy("on-demand:predictor=shadow-int8,dense=fp16").params["dense"] == "fp16"
    with pytest.raises(HarnessError, match="unknown predictor"):
        make_strategy("on-demand:shadow-int4")
    with pytest.raises(HarnessError, match="unknown dense precision 'bf16'"):
        make_strategy("on-demand:predictor=shadow-int8,dense=bf16")
    with pytest.raises(HarnessError, match="the gate predictor has none"):
        make_strategy("on-demand:predictor=gate,dense=fp16")


def test_a_shadow_with_int8_experts_and_fp16_elsewhere(tiny_model):
    """`dense=fp16`: the shadow's experts int8 (a scale per row), every other linear layer fp16 (no scale); exact
    tokens; its weights between the all-int8 and the all-fp16 shadow's; the result names the deviation."""
    model_dir = tiny_model("olmoe")
    reference = generate(reference_model(model_dir), PROMPT, NEW_TOKENS, "greedy").token_ids
    index = PackIndex.load(pack_paths(model_dir)["index"])
    nbytes = {}
    for spec in ("on-demand:shadow-int8:1", "on-demand:shadow-fp16:1", "on-demand:predictor=shadow-int8,dense=fp16"):
        tokens, strategy, _ = strategy_tokens(model_dir, spec, index.num_experts)
        assert tokens == reference, spec
        nbytes[spec] = strategy.stats()["shadow_weight_bytes"]
    shadow = strategy.shadow
    linears = [m for m in shadow.layers.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.stored.dtype == torch.float16 and m.scale is None for m in linears)
    experts = list(shadow.experts.values())
    assert all(getattr(e, f"{n}_stored").dtype == torch.int8 for e in experts for n in e.names)
    assert nbytes["on-demand:shadow-int8:1"] < nbytes[spec] < nbytes["on-demand:shadow-fp16:1"]
    stats = strategy.stats()
    assert stats["predictor"] == "shadow-int8" and stats["shadow_dense_precision"] == "fp16"
    assert any("experts int8, other matrices fp16" in d for d in strategy.deviations)
    assert any("OD-MoE quantises the whole shadow alike" in d for d in strategy.deviations)


def test_int8_quantisation_within_half_a_step_and_the_scale_rounding():
    weight = torch.randn(16, 32, dtype=torch.bfloat16)
    stored, scale = quantize(weight, "int8")
    assert stored.dtype == torch.int8 and scale.shape == (16, 1)
    error = (dequantize(stored, scale, torch.float32) - weight.float()).abs()
    # Half a step, plus the scale's own fp16 rounding (2**-11 relative) times at most 127 steps.
    assert bool((error <= scale.float() * (0.5 + 127 * 2**-11) * 1.001).all())


def _tiny_int8_shadow_weight_bytes(config) -> int:
    """The int8 shadow of the tiny OLMoE by hand: int8 matrices with an fp16 scale per output row (attention
    projections, experts), float32 norms and router (OLMoE's router is a parameter, not an nn.Linear)."""
    h, i, e = config.hidden_size, config.intermediate_size, config.num_experts
    head_dim = h // config.num_attention_heads
    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    attention = sum(rows * h + rows * 2 for rows in (q_out, kv_out, kv_out)) + (h * q_out + h * 2)
    norms = (q_out + kv_out + h + h) * 4
    router = e * h * 4
    experts = e * ((2 * i * h + 2 * i * 2) + (h * i + h * 2))  # gate_up [2I, H], down [H, I]
    return config.num_hidden_layers * (attention + norms + router + experts)


def test_shadow_comes_out_of_the_budget(tiny_model):
    """Under a budget the shadow takes ceil(its bytes / expert stride) of the budget's expert slots; tokens stay
    the resident model's; a budget that cannot hold it (alone, or beside the staging slots) is refused."""
    model_dir = tiny_model("olmoe")
    reference = generate(reference_model(model_dir), PROMPT, NEW_TOKENS, "greedy").token_ids
    index = PackIndex.load(pack_paths(model_dir)["index"])
    layers, stride = len(index.moe_layers), index.stride_bytes
    config = load_config(model_dir)
    weights = _tiny_int8_shadow_weight_bytes(config)
    kv_bytes = (len(PROMPT) + NEW_TOKENS) * _kv_bytes_per_token(config)
    assert (weights, kv_bytes, stride) == (142336, 22528, 24576)  # 164864 bytes: 6.7 slots -> 7
    budget = CacheRequest(6, "per-layer", "lru", 0, 2, budgeted=True, kv_cache_bytes=kv_bytes, budget_slots=12)
    tokens, strategy, _ = strategy_tokens(model_dir, "on-demand:shadow-int8:1", budget)
    assert tokens == reference
    stats = strategy.stats()
    assert stats["shadow_weight_bytes"] == weights
    assert (stats["budget_expert_slots"], stats["shadow_slots"], stats["expert_slots_left"]) == (12, 7, 5)
    assert stats["budget_expert_bytes"] == 12 * stride and stats["staging_bytes"] == index.top_k * layers * stride
    assert stats["shadow_and_staging_within_budget"] is True
    assert any("come out of the budget's 12, leaving 5" in d for d in strategy.deviations)
    # 5 per layer: 10 slots, the shadow's 7 leave 3 for 4 staging slots; 3 per layer: 6, the shadow alone is 7.
    for slots, says in [(5, "leaves 3 of the budget's 10 expert slots"), (3, "more than the budget's 6")]:
        with pytest.raises(HarnessError, match=says):
            strategy_tokens(
                model_dir,
                "on-demand:shadow-int8:1",
                CacheRequest(slots, "per-layer", "lru", 0, 2, True, kv_bytes, slots * layers),
            )
    # Without a budget its memory is beside the slots, not judged against them.
    _, unbounded, _ = strategy_tokens(model_dir, "on-demand:shadow-int8:1", index.num_experts)
    assert unbounded.stats()["shadow_and_staging_within_budget"] is None


def test_shadow_budget_at_plan_time_and_the_verdict(tiny_model, tmp_path):
    """--cache-experts is known before any load: the shadow's experts and KV cache (from the pack's index) that
    cannot fit are refused then, nothing written; a budget that holds it gives a run without a budget failure."""
    model_dir = tiny_model("olmoe")
    index = PackIndex.load(pack_paths(model_dir)["index"])
    experts = shadow_expert_bytes(index, "int8")
    assert experts == 2 * 8 * ((64 * 64 + 64 * 2) + (64 * 32 + 64 * 2))  # the experts' part of the hand count
    spec = RunSpec(
        model=str(model_dir),
        strategy="on-demand:shadow-int8:1",
        prompt="the quick brown fox",
        decode="greedy",
        max_new_tokens=4,
        warmup_steps=1,
        min_steady_s=0,
        telemetry_hz=5,
    )
    with pytest.raises(HarnessError, match=r"more than the budget's 4 expert slots; use --cache-experts \d+"):
        execute(spec.model_copy(update={"cache_experts": "25%"}), tmp_path)
    assert not any(tmp_path.iterdir())
    result = execute(spec.model_copy(update={"cache_experts": "75%"}), tmp_path)
    stats = result["strategy"]["stats"]
    # The shadow's slots: its weights (the hand count above) and the KV cache planned for prompt + 4 new tokens.
    prompt_tokens = len(AutoTokenizer.from_pretrained(str(model_dir)).encode(spec.prompt))
    config = load_config(model_dir)
    planned = _tiny_int8_shadow_weight_bytes(config) + (prompt_tokens + 4) * _kv_bytes_per_token(config)
    assert stats["budget_expert_slots"] == 12 and stats["shadow_slots"] == math.ceil(planned / 24576) == 7
    assert stats["shadow_and_staging_within_budget"] is True
    assert not any("shadow" in reason for reason in result["validity"]["reasons"])


def test_fit_budget_counts_and_advice():
    stride = 3 << 20

    def pack(layers: int, top_k: int) -> SimpleNamespace:  # what fit_budget reads of a PackIndex
        return SimpleNamespace(stride_bytes=stride, top_k=top_k, moe_layers=list(range(layers)), num_experts=64)

    # 100 slots of shadow out of 200 leave 100, beside 40 staging slots (4 layers x top-10).
    assert fit_budget(pack(4, 10), "int8", 100 * stride - 1, "x", 200) == 100
    # olmoe-small's fp16 shadow (770 slots) at 50% (384 of 768): 73 slots per layer would be needed, of 64.
    olmoe_small = pack(12, 8)  # 96 staging slots
    with pytest.raises(HarnessError, match=r"no --cache-experts can hold it \(it needs 73 slots per layer, the model"):
        fit_budget(olmoe_small, "fp16", 770 * stride, "x", 384)
    with pytest.raises(HarnessError, match=r"more than the budget's 192 expert slots; use --cache-experts 41 "):
        fit_budget(olmoe_small, "int8", 387 * stride, "x", 192)


def test_a_ram_budget_holds_slots_past_the_models_experts(tiny_model):
    """The expert cache stops at the model's experts, but the budget does not: what a RAM budget holds beyond them
    is there for a shadow (an fp16 shadow of every expert is more slots than the model's experts)."""
    index = PackIndex.load(pack_paths(tiny_model("olmoe"))["index"])
    layers, stride = len(index.moe_layers), index.stride_bytes
    baseline, workspace = 8 << 20, 1 << 20
    slots, _, budget = resolve_slots(RunSpec(model="m", prompt="p", ram_budget="64MiB"), index, baseline, workspace)
    assert slots == index.num_experts  # per layer: every expert
    assert budget == ((64 << 20) - baseline - workspace) // stride > index.num_experts * layers
    half = RunSpec(model="m", prompt="p", cache_experts="50%")
    assert resolve_slots(half, index, baseline, workspace)[::2] == (
        index.num_experts // 2,
        index.num_experts // 2 * layers,
    )


def test_shadow_refuses_a_quantized_pack_at_plan_time(tiny_model, tmp_path):
    """A quantized pack holds integer codes and scales, not the weights the shadow would quantise: refused before
    any load, nothing written; the gate predictor runs on it."""
    model_dir = tmp_path / "int4"
    shutil.copytree(tiny_model("olmoe"), model_dir)
    pack_model(model_dir, force=True, expert_dtype="int4")
    spec = RunSpec(
        model=str(model_dir), strategy="on-demand:shadow-int8:1", prompt="the fox", decode="greedy", max_new_tokens=2
    )
    results = tmp_path / "results"
    with pytest.raises(HarnessError, match="this pack stores them as int4: run it on a pack of the model's own"):
        execute(spec, results)
    assert not results.exists() or not any(results.iterdir())
    with pytest.raises(HarnessError, match="stores them as int4"):
        shadow_expert_bytes(PackIndex.load(pack_paths(model_dir)["index"]), "int8")
