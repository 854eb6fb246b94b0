"""Look-ahead strategies (router before attention, with and without the next-layer gate): exact tokens,
recall scored on every decode layer step, prefetch accounting that adds up, prefill prefetching."""

from __future__ import annotations

import pytest
import torch

from harness.errors import HarnessError
from harness.models.loader import reference_model
from harness.models.packer import pack_paths
from harness.runtime.generation import generate
from harness.runtime.strategies.base import likely_experts, prediction_reads, widened
from harness.store.layout import PackIndex
from tests.test_strategies import NEW_TOKENS, PROMPT, strategy_tokens


@pytest.mark.parametrize("arch", ["olmoe", "mixtral"])
def test_lookahead_tokens_match_resident_model(arch, tiny_model):
    model_dir = tiny_model(arch)
    reference = generate(reference_model(model_dir), PROMPT, NEW_TOKENS, "greedy").token_ids
    index = PackIndex.load(pack_paths(model_dir)["index"])
    k = index.top_k
    for spec, slots, scope in [
        ("lookahead", k, "per-layer"),
        ("lookahead+gate", k, "per-layer"),
        ("lookahead+gate:prefill=0", index.num_experts // 2, "per-layer"),
        ("lookahead+gate", k * len(index.moe_layers), "global"),
    ]:
        tokens, _, _ = strategy_tokens(model_dir, spec, slots, scope)
        assert tokens == reference, f"{arch} {spec} {scope}"


def test_lookahead_recall_and_prefetch_accounting(tiny_model):
    model_dir = tiny_model("olmoe")
    index = PackIndex.load(pack_paths(model_dir)["index"])
    layers = len(index.moe_layers)
    _, strategy, cache = strategy_tokens(model_dir, "lookahead+gate", index.num_experts // 2)
    stats = strategy.stats()
    # The look-ahead predicts every MoE layer of every decode step; the gate every layer but the first.
    assert stats["prediction"]["predictions"] == (NEW_TOKENS - 1) * layers
    assert stats["gate_prediction"]["predictions"] == (NEW_TOKENS - 1) * (layers - 1)
    assert stats["combined_prediction"]["predictions"] == (NEW_TOKENS - 1) * layers
    assert 0 < stats["prediction"]["recall"] <= stats["combined_prediction"]["recall"] <= 1
    pf = stats["prefetch"]
    assert pf["issued"] == pf["used"] + pf["wasted"] + pf["cancelled"]
    assert pf["requested"] == pf["already_resident"] + pf["issued"] + pf["not_admitted"]
    assert pf["wasted_bytes"] == pf["wasted"] * index.stride_bytes
    assert len(cache.stats.records) == pf["issued"] - pf["cancelled"] + cache.book.total().misses
    # Prefill prefetches: with prefill=0 nothing is read ahead before the first decode step.
    _, _, cache0 = strategy_tokens(model_dir, "lookahead:prefill=0", index.num_experts // 2)
    _, _, cache1 = strategy_tokens(model_dir, "lookahead", index.num_experts // 2)
    assert cache1.book.total("prefill").hits > cache0.book.total("prefill").hits == 0


def test_likely_experts_keeps_each_tokens_heaviest():
    weights = torch.tensor([[0.1, 0.5, 0.4], [0.6, 0.3, 0.1]])
    indices = torch.tensor([[7, 3, 9], [1, 3, 8]])
    assert likely_experts(weights, indices, 2) == {3, 9, 1}
    assert likely_experts(weights, indices, 1) == {3, 1}
    assert likely_experts(weights, indices, 0) == likely_experts(weights, indices, 3) == {7, 3, 9, 1, 8}


def test_a_widened_prediction_adds_each_tokens_next_highest_logits():
    logits = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.8, 0.0], [0.7, 0.0, 0.2, 0.6, 0.1, 0.4]])
    # Routed experts need not be the highest logits (a router with a bias): the widening adds among the others.
    indices = torch.tensor([[1, 3], [0, 5]])
    assert widened(logits, indices, 4).tolist() == [[1, 3, 4, 2], [0, 5, 3, 2]]
    assert widened(logits, indices, 2) is indices and widened(logits, indices, 0) is indices
    assert sorted(widened(logits, indices, 99)[0].tolist()) == list(range(6))  # at most every expert
    weights = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    predicted, staged, kept = prediction_reads(7, logits, weights, indices, 3)
    assert predicted == {1, 3, 4, 0, 5} and staged == [0, 1, 3, 4, 5]
    assert kept == tuple((7, e) for e in staged)
    predicted, staged, kept = prediction_reads(7, logits, weights, indices, 1)  # below k: the heaviest, all kept
    assert predicted == {0, 1, 3, 5} and staged == [0, 1] and kept == tuple((7, e) for e in (0, 1, 3, 5))


@pytest.mark.parametrize("spec", ["prefetch", "lookahead+gate:prefill=0"])
def test_a_wider_top_reads_more_and_recalls_at_least_as_much(spec, tiny_model):
    model_dir = tiny_model("olmoe")
    reference = generate(reference_model(model_dir), PROMPT, NEW_TOKENS, "greedy").token_ids
    index = PackIndex.load(pack_paths(model_dir)["index"])
    slots, wide = index.num_experts // 2, index.top_k + 2
    _, plain, _ = strategy_tokens(model_dir, spec, slots)
    tokens, wider, _ = strategy_tokens(model_dir, f"{spec}{',' if ':' in spec else ':'}top={wide}", slots)
    assert tokens == reference
    # The same routing (exact tokens), scored on a superset of each prediction.
    got, base = wider.stats()["prediction"], plain.stats()["prediction"]
    assert got["predictions"] == base["predictions"] and got["used_keys"] == base["used_keys"]
    assert got["recall"] >= base["recall"] and got["predicted_keys"] > base["predicted_keys"]
    assert wider.stats()["prefetch"]["requested"] > plain.stats()["prefetch"]["requested"]
    assert any("and its 2 next highest router logits" in d for d in wider.deviations)
    # Wider than the model's experts: every expert, and the deviation counts the ones there are.
    everything = index.num_experts + 5
    _, widest, _ = strategy_tokens(model_dir, f"{spec}{',' if ':' in spec else ':'}top={everything}", slots)
    assert any(f"and its {index.num_experts - index.top_k} next highest" in d for d in widest.deviations)


def test_lookahead_top_reads_fewer_and_scores_the_whole_prediction(tiny_model):
    model_dir = tiny_model("olmoe")
    reference = generate(reference_model(model_dir), PROMPT, NEW_TOKENS, "greedy").token_ids
    index = PackIndex.load(pack_paths(model_dir)["index"])
    slots = index.num_experts // 2
    _, full, _ = strategy_tokens(model_dir, "lookahead+gate:prefill=0", slots)
    tokens, part, _ = strategy_tokens(model_dir, "lookahead+gate:prefill=0,top=1", slots)
    assert tokens == reference
    # The recall scores every predicted expert whatever `top` reads; a decode step's prediction reads one.
    assert part.stats()["prediction"] == full.stats()["prediction"]
    assert part.stats()["gate_prediction"] == full.stats()["gate_prediction"]
    calls = part.stats()["prediction"]["predictions"] + part.stats()["gate_prediction"]["predictions"]
    assert part.stats()["prefetch"]["requested"] == calls
    # The result names the deviation from the published predictors, which read the whole prediction.
    assert any(f"heaviest predicted experts of its {index.top_k}" in d for d in part.deviations)
    assert not any("heaviest" in d for d in full.deviations)
    assert part.stats()["prefetch"]["requested"] < full.stats()["prefetch"]["requested"]


def test_lookahead_gate_distance(tiny_model):
    model_dir = tiny_model("olmoe")
    reference = generate(reference_model(model_dir), PROMPT, NEW_TOKENS, "greedy").token_ids
    index = PackIndex.load(pack_paths(model_dir)["index"])
    layers, slots = len(index.moe_layers), index.num_experts // 2
    tokens, strategy, _ = strategy_tokens(model_dir, "lookahead+gate:distance=2", slots)
    assert tokens == reference
    # Layer l predicts layer l+d: every decode step scores the gate on all but the first d MoE layers (the tiny
    # model has 2: distance 2 reaches past the last, so only the look-ahead reads, as `lookahead` alone does).
    _, near, _ = strategy_tokens(model_dir, "lookahead+gate:distance=1", slots)
    _, alone, _ = strategy_tokens(model_dir, "lookahead", slots)
    assert near.stats()["gate_prediction"]["predictions"] == (NEW_TOKENS - 1) * (layers - 1) > 0
    assert strategy.stats()["gate_prediction"]["predictions"] == (NEW_TOKENS - 1) * max(layers - 2, 0)
    counted = ("requested", "already_resident", "issued", "not_admitted", "used")  # not timing-dependent
    assert [strategy.stats()["prefetch"][k] for k in counted] == [alone.stats()["prefetch"][k] for k in counted]
    with pytest.raises(HarnessError, match="distance must be at least 1"):
        strategy_tokens(model_dir, "lookahead+gate:distance=0", slots)
