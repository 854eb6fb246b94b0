"""Hand-computed hit/miss counts of the shared cache loop with LRU and LFU."""

import pytest

from harness.cache.book import ExpertCacheBook
from harness.cache.registry import policy_factory
from harness.errors import HarnessError


def replay(policy: str, steps: list[list[int]], capacity: int, scope: str = "per-layer", layers=(0,)):
    book = ExpertCacheBook(layers, capacity, scope, policy_factory(policy))
    plans = [book.step(0, experts, now) for now, experts in enumerate(steps)]
    return book, plans


def test_lru_and_lfu_differ_where_frequency_matters():
    steps = [[0], [0], [1], [2], [0]]
    lru, _ = replay("lru", steps, capacity=2)
    lfu, _ = replay("lfu", steps, capacity=2)
    # LRU evicts 0 at step 3 (last used at step 1) and misses it again; LFU keeps it (2 uses).
    assert (lru.total().hits, lru.total().misses) == (1, 4)
    assert (lfu.total().hits, lfu.total().misses) == (2, 3)


def test_lru_victims_by_hand():
    book, plans = replay("lru", [[0, 1], [2], [0], [1], [2, 0]], capacity=2)
    assert [p.evicted for p in plans] == [[], [(0, 0)], [(0, 1)], [(0, 2)], [(0, 1)]]
    assert (book.total().hits, book.total().misses) == (1, 6)


def test_step_never_evicts_what_it_needs_and_streams_overflow():
    book, plans = replay("lru", [[0, 1, 2]], capacity=2)
    plan = plans[0]
    assert [key for key, _ in plan.loads] == [(0, 0), (0, 1)]
    assert plan.streamed == [(0, 2)] and plan.evicted == []
    assert book.total().misses == 3


def test_duplicates_within_a_step_count_once_and_phases_apart():
    book = ExpertCacheBook([0], 4, "per-layer", policy_factory("lru"))
    book.step(0, [3, 3, 1], 0, "prefill")
    book.step(0, [3], 1, "decode")
    assert (book.counts["prefill"][0].hits, book.counts["prefill"][0].misses) == (0, 2)
    assert (book.counts["decode"][0].hits, book.counts["decode"][0].misses) == (1, 0)


def test_global_scope_shares_slots_across_layers():
    book = ExpertCacheBook([0, 1], 2, "global", policy_factory("lru"))
    book.step(0, [5], 0)
    book.step(1, [5], 0)
    plan = book.step(0, [6], 1)
    assert plan.evicted == [(0, 5)] and book.total_slots == 2


def test_windowed_lfu_forgets_old_counts():
    # Expert 0 is hot early, expert 1 later; with a window of 2 steps, 0's old uses no longer count.
    steps = [[0], [0], [0], [1], [1], [2], [0]]
    life, _ = replay("lfu", steps, capacity=2)
    window, _ = replay("lfu-window:2", steps, capacity=2)
    assert life.slot_of((0, 0)) is not None
    assert (life.total().hits, window.total().hits) == (4, 3)


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(HarnessError, match=r"unknown policy 'nope'; known policies: .*lru"):
        policy_factory("nope")
