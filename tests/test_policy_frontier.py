"""The newer policies (fwlru, lrfu, lrfu-admit, sieve, s3fifo, least-stale, layer-lru, static, static-oracle):
hand-computed victims and counts, each on steps where it decides differently from LRU."""

import numpy as np
import pytest

from harness.cache.book import ExpertCacheBook
from harness.cache.policies.belady import FutureAccesses
from harness.cache.policies.reuse_logit import PROFILE, start_weights
from harness.cache.profile import FrequencyProfile
from harness.cache.registry import policy_factory
from harness.errors import HarnessError


def replay(policy: str, steps: list[list[int]], capacity: int, **context):
    """Steps of layer 0 (step i at now = i) through a per-layer book; returns the book and each step's plan."""
    future = FutureAccesses({})
    for now, experts in enumerate(steps):
        for e in sorted(set(experts)):
            future.times.setdefault((0, e), []).append(now)
    book = ExpertCacheBook([0], capacity, "per-layer", policy_factory(policy, future=future, **context))
    return book, [book.step(0, experts, now) for now, experts in enumerate(steps)]


def evicted(plans) -> list[list[int]]:
    return [[e for _, e in p.evicted] for p in plans]


def test_fwlru_weighs_accesses_against_recency():
    # t3 needs 2. Expert 0: 2 accesses, last t1 -> 10 x 2 + 1 = 21; expert 1: 1 access, last t2 -> 12.
    # fwlru evicts 1; with w = 0 it is LRU and evicts 0 (older).
    steps = [[0], [0], [1], [2]]
    assert evicted(replay("fwlru", steps, 2)[1]) == [[], [], [], [1]]
    assert evicted(replay("fwlru:0", steps, 2)[1]) == evicted(replay("lru", steps, 2)[1]) == [[], [], [], [0]]


def test_fwlru_counts_restart_after_an_eviction():
    # t1: 0 has 2 accesses, last t1 -> 21. t3 (needs 2) evicts 1 (12); t4 (needs 1) evicts 2 (13). 1 returns with
    # a count of 1 (last t4 -> 14), so t5 (needs 3) evicts it rather than 0 (21); lifetime counts would give it
    # 2 x 10 + 4 = 24 and evict 0.
    steps = [[0], [0], [1], [2], [1], [3]]
    assert evicted(replay("fwlru", steps, 2)[1]) == [[], [], [], [1], [2], [1]]


@pytest.mark.parametrize(("policy", "victim"), [("lrfu:1", 0), ("lrfu:0.5", 1), ("lrfu:0", 1), ("lrfu", 1)])
def test_lrfu_spans_lru_to_lfu(policy, victim):
    # t3 needs 2. CRF at t3 with lambda 1: expert 0 (used t0, t1) 1/8 + 1/4 = 0.375 < expert 1 (t2) 0.5: evict 0,
    # as LRU. lambda 0.5: 2^-1.5 + 2^-1 = 0.854 > 2^-0.5 = 0.707: evict 1. lambda 0: counts 2 > 1, as LFU.
    assert evicted(replay(policy, [[0], [0], [1], [2]], 2)[1]) == [[], [], [], [victim]]


def test_lrfu_argument_errors():
    for spec in ("lrfu:x", "lrfu:-1", "fwlru:-2", "fwlru:nan"):
        with pytest.raises(HarnessError):
            policy_factory(spec)(2)


def test_lrfu_admit_keeps_the_frequent_experts_and_streams_one_offs():
    # Lambda 0 (counts). t4 needs 2 (count 1): the victim would be 0 (count 2, last t1), which ranks above 2:
    # 2 streams and 0, 1 stay, so t5 and t6 hit. Plain LRFU evicts 0 at t4 and misses it at t5.
    steps = [[0], [0], [1], [1], [2], [0], [1]]
    book, plans = replay("lrfu-admit:0", steps, 2)
    assert [[e for _, e in p.streamed] for p in plans] == [[], [], [], [], [2], [], []]
    assert (book.total().hits, book.total().misses) == (4, 3)
    book, plans = replay("lrfu:0", steps, 2)
    assert evicted(plans) == [[], [], [], [], [0], [2], []]
    assert (book.total().hits, book.total().misses) == (3, 4)


def test_sieve_hand_passes_visited_keys_and_stays():
    # Capacity 3. t3 hits 0. t4 needs 3: the hand starts at the tail (0, visited: cleared), evicts 1 and stays
    # at 2. t5 needs 4: 2 is unvisited: evicted, the hand moves to 3. t6 hits 3. t7 needs 5: 3 is visited
    # (cleared), 4 is not: evicted. LRU evicts 0 at t7 (last used t3, the oldest).
    steps = [[0], [1], [2], [0], [3], [4], [3], [5]]
    assert evicted(replay("sieve", steps, 3)[1]) == [[], [], [], [], [1], [2], [], [4]]
    assert evicted(replay("lru", steps, 3)[1])[7] == [0]


def test_s3fifo_promotes_reused_keys_and_readmits_ghosts_to_main():
    # Capacity 3: small target 1, ghost 2. t3 hits 0. t4 needs 3: small's tail 0 was hit, so it moves to main;
    # 1 is evicted to the ghost. t5 needs 1 (a ghost): small's tail 2 is evicted, 1 enters main. t6 and t7:
    # the small queue's newcomers 3 and 4 leave in turn. t8 hits 0 and 1, both in main. LRU evicts 0 at t6.
    steps = [[0], [1], [2], [0], [3], [1], [4], [5], [0, 1]]
    _, plans = replay("s3fifo", steps, 3)
    assert evicted(plans) == [[], [], [], [], [1], [2], [3], [4], []]
    assert [len(p.hits) for p in plans][-1] == 2
    assert evicted(replay("lru", steps, 3)[1])[6] == [0]


def global_replay(policy: str, steps: list[list[list[int]]], capacity: int) -> list[list[tuple[int, int]]]:
    """Token steps visiting layers 0, 1, 2 in order through one global group: each step's evictions per layer."""
    book = ExpertCacheBook([0, 1, 2], capacity, "global", policy_factory(policy))
    return [
        [v for v in book.step(layer, experts, now).evicted]
        for now, per_layer in enumerate(steps)
        for layer, experts in enumerate(per_layer)
    ]


@pytest.mark.parametrize("policy", ["least-stale", "layer-lru"])
def test_layer_aware_policies_refuse_a_negative_layer_id(policy):
    with pytest.raises(HarnessError, match=f"{policy}: negative layer id -1"):
        policy_factory(policy)(4).bind([(0, 1), (-1, 0)])


def test_layer_aware_policies_keep_the_next_layers_experts():
    # Capacity 3, full after t0. At t1 layer 0 needs 0 (hit) and 1: the candidates (1, 0) and (2, 0) were both
    # last used at t0. LRU evicts (1, 0), used first in that step, though layer 1 is needed next; layer-lru
    # and least-stale evict (2, 0), whose layer is visited again the latest.
    steps = [[[0], [0], [0]], [[0, 1], [0], [0]]]
    assert global_replay("lru", steps, 3)[3] == [(1, 0)]
    assert global_replay("layer-lru", steps, 3)[3] == [(2, 0)]
    assert global_replay("least-stale", steps, 3)[3] == [(2, 0)]


def test_least_stale_ranks_layers_before_recency_and_layer_lru_recency_before_layers():
    # Capacity 4. After t1: (0, 0) at t1, (1, 0) at t0, (1, 1) at t1, (2, 0) at t1. At t2 layer 0 needs 0 and 1:
    # candidates (1, 0) t0, (1, 1) t1, (2, 0) t1. least-stale takes layer 2 (visited again the latest) first;
    # layer-lru takes the oldest step, (1, 0).
    steps = [[[0], [0], [0]], [[0], [1], [0]], [[0, 1], [0, 1], [0]]]
    assert global_replay("least-stale", steps, 4)[6] == [(2, 0)]
    assert global_replay("layer-lru", steps, 4)[6] == [(1, 0)]


def test_static_oracle_pins_the_most_frequent_of_the_whole_stream():
    # Counts 0: 3, 1: 2, 2: 1. Capacity 2: 0 and 1 stay; 2 streams. LRU: one hit.
    steps = [[0], [1], [2], [0], [1], [0]]
    book, plans = replay("static-oracle", steps, 2)
    assert [[e for _, e in p.streamed] for p in plans] == [[], [], [2], [], [], []]
    assert (book.total().hits, book.total().misses) == (3, 3)
    assert replay("lru", steps, 2)[0].total().hits == 1


def test_static_pins_the_profiles_top_experts():
    # The profile ranks 2, then 1; 0 is unknown (last). t2: 2 ranks above 0: it replaces 0. t3: 0 streams
    # (ranks below 1 and 2), t4 hits 1, t5 streams 0 again.
    profile = FrequencyProfile({(0, 2): 5, (0, 1): 3}, {0: 8})
    book, plans = replay("static", [[0], [1], [2], [0], [1], [0]], 2, profile=profile)
    assert evicted(plans) == [[], [], [0], [], [], []]
    assert [[e for _, e in p.streamed] for p in plans] == [[], [], [], [0], [], [0]]
    assert (book.total().hits, book.total().misses) == (1, 5)


def test_static_needs_a_profile_and_the_oracle_a_future():
    with pytest.raises(HarnessError, match="needs a frequency profile"):
        policy_factory("static")(2)
    with pytest.raises(HarnessError, match="does not exist"):
        policy_factory("static:/nonexistent/trace.parquet")(2)
    with pytest.raises(HarnessError, match="only in `harness simulate`"):
        policy_factory("static-oracle")(2)


def test_reuse_logit_keeps_what_comes_back_and_learns_per_layer():
    # Step t needs t % 2 and a one-off expert 2 + t; capacity 2. LRU and LFU never hit: each step's one-off
    # pushes out the expert the next step needs. reuse-logit learns that 0 and 1 come back and streams the
    # one-offs: after its first steps (misses at t0, t1, t3, t5) every access to 0 and 1 hits.
    steps = [[t % 2, 2 + t] for t in range(60)]
    book, plans = replay("reuse-logit", steps, 2)
    assert book.total().hits == 56 and all(len(p.hits) == 1 for p in plans[6:])
    assert all(p.streamed == [(0, 2 + t)] for t, p in enumerate(plans) if t >= 6)
    assert replay("lru", steps, 2)[0].total().hits == replay("lfu", steps, 2)[0].total().hits == 0
    # Learning moves the weights away from the start (LRFU's log-rate alone).
    (policy,) = book.policies
    assert not np.allclose(policy.weights(0), start_weights())


def test_reuse_logit_reads_a_profile_when_given_one():
    # The profile's log-rate is a feature (clipped at 1e-3): 0 and 1 profiled at rate 0.5, the rest unknown.
    # It learns a weight for it only when there is a profile (without one the feature is 0).
    profile = FrequencyProfile({(0, 0): 5, (0, 1): 5}, {0: 10})
    steps = [[t % 2, 2 + t] for t in range(20)]
    (with_profile,) = replay("reuse-logit", steps, 2, profile=profile)[0].policies
    (without,) = replay("reuse-logit", steps, 2)[0].policies
    assert np.allclose(with_profile.panel(0)[PROFILE, :4], np.log([0.5, 0.5, 1e-3, 1e-3]))
    assert with_profile.weights(0)[-1] != 0 and without.weights(0)[-1] == 0
