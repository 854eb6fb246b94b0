"""The held-out goal policy (`reuse-logit`; `lrfu-prior` is shown beside it): its warm start on a profile's
steps, the same decisions through the live engine's per-key loop and the replay path, and the held-out table
of `harness.benchmarks.heldout_policies`."""

import numpy as np
import pytest

from harness.benchmarks.heldout_policies import GOAL, Row, format_rows, heldout_rows
from harness.cache.book import ExpertCacheBook
from harness.cache.policies.reuse_logit import (
    AGE,
    BLOCK_INTS,
    LAMBDAS,
    PRIOR_HITS,
    PRIOR_STEPS,
    RATE,
    RECENT,
    RECENT_STEPS,
    WIDTH,
    ReuseLogit,
    settle,
    start_weights,
)
from harness.cache.profile import FrequencyProfile
from harness.cache.registry import policy_factory
from harness.trace.simulate import build_replay, profile_of, run_replay
from tests.test_policies import random_trace
from tests.test_policy_frontier import replay
from tests.test_split import write

REUSE = "reuse-logit"
ALTERNATING = [[t % 2, 2 + t] for t in range(60)]
"""Step t needs t % 2 and a one-off expert 2 + t: the experts that come back are 0 and 1."""


def history_profile(layer_steps: list[list[int]], layer: int = 0) -> FrequencyProfile:
    return FrequencyProfile.from_calls((layer, tuple((layer, e) for e in sorted(ex))) for ex in layer_steps)


def test_a_profile_records_each_layers_steps_in_order():
    profile = FrequencyProfile.from_calls([(0, ((0, 3), (0, 5))), (1, ((1, 2),)), (0, ((0, 3),))])
    assert profile.history == {0: [(3, 5), (3,)], 1: [(2,)]}
    assert profile.counts == {(0, 3): 2, (0, 5): 1, (1, 2): 1} and profile.steps == {0: 2, 1: 1}


def test_log_rates_equal_their_definition():
    # Expert 0 at steps 0-6, 1 at steps 0 and 3, 2 at step 1, 3 at step 7 only: the decayed counts, kept step
    # by step, give the log-rates of the definition at the step learned from last (7).
    steps = [[0, 1], [0, 2], [0], [0, 1], [0], [0], [0]]
    policy = ReuseLogit(4, 0)
    for now, experts in enumerate(steps):
        for e in experts:
            policy.on_access((0, e), now, True)
    policy.on_access((0, 3), len(steps), True)  # 3 joins the layer (4 experts), its step learned from below
    settle(policy.g, policy.gf, policy.ki, policy.kf, policy.blocks[0])
    end = len(steps)
    panel = policy.panel(0)
    assert panel.shape[1] == 4
    for i, lam in enumerate(LAMBDAS):
        n = sum(2.0 ** (-lam * (end - t)) for t in range(end + 1))  # the layer's steps 0..end, decayed to `end`
        for e in range(4):
            uses = [t for t, experts in enumerate([*steps, [3]]) if e in experts]
            crf = sum(2.0 ** (-lam * (end - t)) for t in uses)
            expected = np.log((crf + PRIOR_HITS) / (n + PRIOR_STEPS))
            # float32 values (`settle`): within a few of float32's ulps (6e-8 relative)
            assert panel[RATE + i, e] == pytest.approx(expected, rel=3e-7, abs=3e-7), (lam, e)


def test_warm_start_learns_on_the_profile_steps_then_starts_its_history_afresh():
    profile = history_profile(ALTERNATING[:40])
    book, _ = replay("reuse-logit", [[0, 1]], 4, profile=profile)
    (policy,) = book.policies
    # The same weights as a cold model (the profile's counts, not its steps) that learned the profile's 40 steps
    # one by one.
    cold = ReuseLogit(4, 0, FrequencyProfile(profile.counts, profile.steps))
    for i, experts in enumerate(profile.history[0]):
        for e in experts:
            cold.on_access((0, e), i, True)
    settle(cold.g, cold.gf, cold.ki, cold.kf, cold.blocks[0])
    assert np.array_equal(policy.weights(0), cold.weights(0)) and not np.allclose(policy.weights(0), start_weights())
    # ... and a history of the scored step only (0 and 1 at t0, learned here), not of the profile's.
    settle(policy.g, policy.gf, policy.ki, policy.kf, policy.blocks[0])
    panel = policy.panel(0)
    assert panel[AGE].tolist() == [0, 0] and policy.slots == 2  # both used at the step learned from last
    assert policy.decayed_steps(0).tolist() == [1.0] * len(LAMBDAS)
    assert panel[RECENT].tolist() == [1, 1] and panel[RECENT + 1 : RECENT + RECENT_STEPS].sum() == 0
    assert len(policy.weights(0)) == 1 + 5 + 1 + RECENT_STEPS + 1
    # A profile of counts only (no steps) has nothing to warm up on.
    (counts_only,) = replay("reuse-logit", [[0, 1]], 4, profile=FrequencyProfile({(0, 0): 5}, {0: 10}))[0].policies
    assert np.array_equal(counts_only.weights(0), start_weights())


def test_warm_start_streams_the_one_offs_from_the_first_full_step():
    # Cold (test_policy_frontier): misses at t0, t1, t3, t5 among the returning experts (56 hits of 60), as it
    # learns that 0 and 1 come back. Warmed on 40 steps of the same pattern it knows it before the first step:
    # t0 and t1 fill the 2 slots with 0 and 2 (t0), then 1 replaces 2 at t1 (1's prediction beats the one-off's)
    # and from t2 on every access to 0 and 1 hits and every one-off streams: 58 hits.
    book, plans = replay("reuse-logit", ALTERNATING, 2, profile=history_profile(ALTERNATING[:40]))
    assert book.total().hits == 58
    assert all(len(p.hits) == 1 and p.streamed == [(0, 2 + t)] for t, p in enumerate(plans) if t >= 2)
    assert replay("reuse-logit", ALTERNATING, 2)[0].total().hits == 56


@pytest.mark.parametrize(("scope", "capacity"), [("per-layer", 4), ("global", 7), ("per-layer", 3)])
def test_warm_reuse_logit_decides_alike_in_the_engine_loop_and_in_replay(scope, capacity):
    # The engine calls `step` (per-key hooks, a plan); replay calls `account` (replay_step once full).
    train = build_replay(random_trace(8, seqs=1, rows=120, experts=12, k=4))
    profile = profile_of(train, "training part")
    (stream,) = build_replay(random_trace(9, seqs=1, rows=200, experts=12, k=4)).streams
    books = [ExpertCacheBook([0, 1], capacity, scope, policy_factory(REUSE, profile=profile)) for _ in range(2)]
    for layer, keys, now, phase in stream.calls:
        books[0].account(layer, keys, now, phase)
        books[1].step(layer, [e for _, e in keys], now, phase)
        assert {k: books[0].slot_of(k) for k in books[0].resident_keys()} == {
            k: books[1].slot_of(k) for k in books[1].resident_keys()
        }
    assert books[0].total() == books[1].total()
    # The simulator's own replay gives the same counts.
    replayed = run_replay(
        build_replay(random_trace(9, seqs=1, rows=200, experts=12, k=4)), REUSE, capacity, scope, profile=profile
    )
    assert (replayed.total().hits, replayed.total().misses) == (books[0].total().hits, books[0].total().misses)


def test_heldout_rows_compare_the_goal_with_the_best_heuristic_on_the_heldout_part(tmp_path):
    # Training (seq 0): 0 and 1 alternate. Held out (seq 1): 2, 3, 0, 2, 3, 0 with 1 slot (test_split): LRU
    # never hits; static (profiled on seq 0: 0 first) keeps 0 once in, one hit at t5 of 6.
    path = write(tmp_path / "t.parquet", {0: [[0], [1], [0], [1], [0]], 1: [[2], [3], [0], [2], [3], [0]]})
    (row,) = heldout_rows("toy", path, "seq:1", GOAL, "1", "per-layer", heuristics=("lru", "static"))
    assert (row.trace, row.split, row.capacity_pct) == ("toy", "seq:1", 100 / 6)
    assert (row.best_name, row.best) == ("static", 1 / 6)
    assert 0 <= row.goal <= row.belady_bypass and row.static_oracle == 1 / 6
    lines = format_rows([row], GOAL)
    assert GOAL in lines[0] and "static 0.1667" in lines[2]


def test_the_goal_needs_two_points_at_25_percent_and_a_tie_elsewhere():
    row = Row("t", "seq:1", 25.0, "lru", 0.30, 0.319, 0.33, 0.5, 0.5)
    assert not row.met and round(row.lead_points, 2) == 1.9
    assert Row("t", "seq:1", 25.0, "lru", 0.30, 0.32, 0.33, 0.5, 0.5).met
    assert Row("t", "seq:1", 50.0, "lru", 0.30, 0.30, 0.33, 0.5, 0.5).met
    assert not Row("t", "seq:1", 12.5, "lru", 0.30, 0.2999, 0.33, 0.5, 0.5).met


@pytest.mark.parametrize(
    ("policy", "described"), [(REUSE, {"warm_start": True}), ("lrfu-prior", {"prior_steps": 10.0})]
)
def test_a_live_run_profiled_on_a_trace_gives_its_replays_counts(tiny_model, tmp_path, policy, described):
    # `reuse-logit:TRACE` live: each layer's model warms up on TRACE's steps of that layer inside the engine;
    # `lrfu-prior:TRACE`: TRACE's rates are the prior. The run's own trace replayed with the same spec gives
    # the same hits and misses per phase and layer.
    from harness.models.packer import pack_model
    from harness.run import execute
    from harness.spec import RunSpec
    from harness.trace.schema import TraceMeta, TraceWriter, read_trace
    from harness.trace.simulate import simulate

    model = tiny_model("qwen3_moe")
    index, _ = pack_model(model)
    rng = np.random.default_rng(4)
    skew = np.arange(index.num_experts, 0, -1) / np.arange(index.num_experts, 0, -1).sum()
    meta = TraceMeta("profile", "toy", len(index.moe_layers), list(index.moe_layers), index.num_experts, 2, 0, "test")
    writer = TraceWriter(meta)
    for step in range(40):
        for layer in index.moe_layers:
            experts = rng.choice(index.num_experts, 2, replace=False, p=skew)
            writer.add(0, step, step, "decode", layer, experts.tolist(), None)
    profile = writer.write(tmp_path / "profile.parquet")
    spec = RunSpec(
        model=str(model),
        cache_experts="3",
        policy=f"{policy}:{profile}",
        scope="per-layer",
        max_prompts=2,
        max_new_tokens=12,
        warmup_steps=0,
    )
    result = execute(spec, tmp_path / "results")
    trace = read_trace(tmp_path / "results" / spec.run_id / "trace.parquet")
    replayed = simulate(trace, spec.policy, result["resolved"]["cache_slots"], "per-layer")
    live = result["metrics"]["hits"]
    for phase in ("prefill", "decode"):
        for layer, (hits, misses) in live[phase]["per_layer"].items():
            counts = replayed.counts[phase][int(layer)]
            assert (counts.hits, counts.misses) == (hits, misses), (phase, layer)
    assert described.items() <= replayed.description.items() and live["decode"]["hits"] > 0


def test_panels_widened_as_ids_arrive_hold_what_panels_bound_at_once_hold():
    # Live, a layer's experts are bound one by one as they are first seen, so its panel is widened (moved to the
    # end of the floats, other layers' areas closing up) several times; bound at once (replay) it never is. Both
    # must decide alike and hold the same state: widening copies every column, for every layer.
    rng = np.random.default_rng(3)
    steps = [
        (layer, sorted(rng.choice(min(4 + 3 * t, 40), 3, replace=False).tolist()))
        for t in range(40)
        for layer in (0, 1)
    ]
    grown, bound = ReuseLogit(6, 0), ReuseLogit(6, 0)
    bound.bind([(layer, e) for layer in (0, 1) for e in range(40)])
    widths = set()
    for now, (layer, experts) in enumerate(steps):
        for policy in (grown, bound):
            for e in experts:
                policy.on_access((layer, e), now // 2, True)
        widths.add(int(grown.g[BLOCK_INTS * grown.blocks[0] + WIDTH]))
    for policy in (grown, bound):
        settle(policy.g, policy.gf, policy.ki, policy.kf, policy.blocks[0])
        settle(policy.g, policy.gf, policy.ki, policy.kf, policy.blocks[1])
    assert sorted(widths) == [8, 16, 32, 64]  # 8 at first, then doubled as larger ids arrived
    for layer in (0, 1):
        assert np.array_equal(grown.panel(layer), bound.panel(layer))
        assert np.array_equal(grown.weights(layer), bound.weights(layer))
    candidates = {(layer, e) for layer in (0, 1) for e in range(0, 36, 5)}
    assert grown.victim(candidates, (0, 1), 40) == bound.victim(candidates, (0, 1), 40)
