"""Strategies in the live engine: exact ones generate the resident model's tokens bit for bit; DAOP-style
reports its token agreement and prediction recall; prefetch statistics add up."""

from __future__ import annotations

import json

import pytest

from harness.cache.book import ExpertCacheBook
from harness.cache.registry import policy_factory
from harness.errors import HarnessError
from harness.models.loader import reference_model
from harness.models.packer import pack_paths
from harness.run import execute
from harness.runtime.engine import OffloadEngine
from harness.runtime.generation import generate
from harness.runtime.strategies import CacheRequest, make_strategy
from harness.runtime.strategies.fiddler import CostModel
from harness.spec import RunSpec
from harness.store.layout import PackIndex

PROMPT = [5, 17, 99, 3, 250, 7, 8, 100, 42, 11]
NEW_TOKENS = 12


def strategy_tokens(model_dir, spec: str, slots: int | CacheRequest, scope: str = "per-layer"):
    paths = pack_paths(model_dir)
    index = PackIndex.load(paths["index"])
    strategy = make_strategy(spec)
    request = (
        slots if isinstance(slots, CacheRequest) else CacheRequest(slots, strategy.forced_scope or scope, "lru", 0, 2)
    )
    engine = OffloadEngine(model_dir, index, paths["experts"], paths["dense"])
    try:
        source = strategy.build(engine, request)
        engine.use_source(source, strategy if strategy.has_hooks else None)
        log = generate(engine.model, PROMPT, NEW_TOKENS, "greedy", ctx=engine.ctx)
        strategy.finish()
    finally:
        engine.close()
    return log.token_ids, strategy, source


@pytest.mark.parametrize("arch", ["olmoe", "mixtral"])
def test_exact_strategies_match_resident_model(arch, tiny_model):
    model_dir = tiny_model(arch)
    reference = generate(reference_model(model_dir), PROMPT, NEW_TOKENS, "greedy").token_ids
    index = PackIndex.load(pack_paths(model_dir)["index"])
    k = index.top_k
    for spec, slots in [("prefetch", k), ("prefetch:2", index.num_experts // 2), ("on-demand", k), ("fiddler", k)]:
        tokens, _, source = strategy_tokens(model_dir, spec, slots)
        assert tokens == reference, f"{arch} {spec}"
        assert source.book.total("decode").accesses > 0
    tokens, _, _ = strategy_tokens(model_dir, "prefetch", k * len(index.moe_layers), scope="global")
    assert tokens == reference


def test_prefetch_counts_and_recall(tiny_model):
    model_dir = tiny_model("olmoe")
    _, strategy, cache = strategy_tokens(model_dir, "prefetch", 4)
    stats = strategy.stats()
    pf, pred = stats["prefetch"], stats["prediction"]
    index = PackIndex.load(pack_paths(model_dir)["index"])
    # Every decode step predicts for every MoE layer but the first.
    assert pred["predictions"] == (NEW_TOKENS - 1) * (len(index.moe_layers) - 1)
    assert 0 < pred["recall"] <= 1
    assert pf["issued"] == pf["used"] + pf["wasted"] + pf["cancelled"]
    assert pf["requested"] == pf["already_resident"] + pf["issued"] + pf["not_admitted"]
    assert pf["wasted_bytes"] == pf["wasted"] * index.stride_bytes
    # Prefetch reads are SSD reads: the cache's records hold demand loads plus every issued prefetch.
    assert len(cache.stats.records) == pf["issued"] - pf["cancelled"] + cache.book.total().misses


def test_on_demand_keeps_nothing_between_tokens(tiny_model):
    model_dir = tiny_model("olmoe")
    _, strategy, cache = strategy_tokens(model_dir, "on-demand", 0)
    assert cache.book.resident_keys() == set() and cache.book.staged_keys() == set()
    # Decode hits are exactly the used prefetches: nothing else can be resident.
    assert cache.book.total("decode").hits == strategy.stats()["prefetch"]["used"]


def test_book_prefetch_stages_without_counting_and_drops_unused():
    book = ExpertCacheBook([0], 2, "per-layer", policy_factory("lfu"))
    book.step(0, [1], 0)
    plan = book.prefetch(0, [2, 3], 1, protect=[(0, 1)])
    assert [key for key, _ in plan.loads] == [(0, 2)] and plan.hits == []  # one free slot; (0, 1) protected
    assert book.total().accesses == 1
    step = book.step(0, [1], 1)
    assert step.dropped == [(0, 2)] and book.staged_keys() == set()
    plan = book.prefetch(0, [3], 2)  # the dropped key's slot is free again
    assert plan.evicted == [] and [k for k, _ in plan.loads] == [(0, 3)]
    step = book.step(0, [3], 3)
    assert [k for k, _ in step.hits] == [(0, 3)] and (book.total().hits, book.total().misses) == (2, 1)


def test_daop_reports_agreement_and_recall(tiny_model, tmp_path):
    model_dir = tiny_model("olmoe")
    spec = RunSpec(
        model=str(model_dir),
        cache_experts="50%",
        strategy="daop:start=0",
        prompt="the quick brown fox jumps over the lazy dog",
        decode="greedy",
        max_new_tokens=10,
        warmup_steps=0,
        telemetry_hz=5,
    )
    result = execute(spec, tmp_path)
    section = json.loads(json.dumps(result["strategy"]))
    assert section["name"] == "daop" and section["exact"] is False and section["deviations"]
    assert 0 <= section["token_agreement"]["agreement"] <= 1
    assert section["token_agreement"]["positions"] == 10
    assert 0 <= section["stats"]["prediction"]["recall"] <= 1
    assert section["stats"]["precomputed_experts"] > 0
    assert result["resolved"]["scope"] == "per-layer"
    # The device reads this process made cover every byte the run counts (the unmeasured exact pass
    # must not add to the measured bytes).
    assert not any("did not reach the device" in reason for reason in result["validity"]["reasons"])


def test_fiddler_cost_model_picks_the_cheaper_side():
    model = CostModel(t_cpu_token_s=1e-3, t_copy_s=5e-3)
    assert model.side(1, resident=True) == "gpu"
    assert model.side(2, resident=False) == "cpu"
    assert model.side(10, resident=False) == "gpu"
    assert CostModel(1e-3, None).side(10, resident=False) == "cpu"


def test_unknown_strategy_and_parameter_are_one_line_errors():
    with pytest.raises(HarnessError, match=r"unknown strategy 'nope'; known strategies: .*fiddler.*on-demand"):
        make_strategy("nope")
    with pytest.raises(HarnessError, match=r"no parameter 'depth'"):
        make_strategy("prefetch:depth=2")
