"""A live run's own trace, replayed with the same policy, capacity and scope, gives its hit and miss counts."""

from __future__ import annotations

import pytest

from harness.results import read_json
from harness.run import execute
from harness.spec import RunSpec
from harness.trace.schema import read_trace
from harness.trace.simulate import simulate


@pytest.mark.parametrize(
    ("policy", "scope", "slots"),
    [
        ("lru", "per-layer", "3"),
        ("lfu", "global", "5"),
        ("arc", "per-layer", "4"),
        ("lrfu-admit", "per-layer", "3"),  # admission: streamed misses, live and replayed
        ("reuse-logit", "global", "6"),
        ("least-stale", "global", "5"),
    ],
)
def test_replay_equals_live_counts(tiny_model, tmp_path, policy, scope, slots):
    spec = RunSpec(
        model=str(tiny_model("qwen3_moe")),
        cache_experts=slots,
        policy=policy,
        scope=scope,
        max_prompts=2,
        max_new_tokens=12,
        warmup_steps=0,
    )
    result = execute(spec, tmp_path)
    saved = read_json(tmp_path / spec.run_id / "result.json")
    assert saved["run_id"] == spec.run_id and saved["status"] == "ok"
    trace = read_trace(tmp_path / spec.run_id / "trace.parquet")
    replay = simulate(trace, policy, result["resolved"]["cache_slots"], scope)
    live = result["metrics"]["hits"]
    for phase in ("prefill", "decode"):
        for layer, (hits, misses) in live[phase]["per_layer"].items():
            counts = replay.counts[phase][int(layer)]
            assert (counts.hits, counts.misses) == (hits, misses), (phase, layer)
    assert live["decode"]["hits"] > 0 and live["decode"]["misses"] > 0
    assert result["metrics"]["ssd_read_bytes"] == replay.total().misses * result["resolved"]["expert_stride_bytes"]
