"""The compiled replay of ranked policies (LRU, LFU) decides as the per-key hooks do: same slots, same counts."""

from __future__ import annotations

import numpy as np
import pytest

from harness.cache.book import ExpertCacheBook
from harness.cache.policies.lru import LRU
from harness.cache.ranked import RankedPolicy
from harness.cache.registry import policy_factory
from harness.trace.schema import SequenceRouting, Trace, TraceMeta
from harness.trace.simulate import build_replay


def _trace(seed: int, rows: int, layers: int, experts: int, k: int, batch: int) -> Trace:
    """Skewed routing; `batch` rows share each step, so a step's distinct experts per layer vary in number."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, experts + 1)
    experts_of = np.stack(
        [[rng.choice(experts, k, replace=False, p=weights / weights.sum()) for _ in range(layers)] for _ in range(rows)]
    ).astype(np.int16)
    step = (np.arange(rows) // batch).astype(np.int32)
    phase = np.where(step % 5 == 0, 0, 1).astype(np.int8)
    seq = SequenceRouting(0, step, np.arange(rows, dtype=np.int32), phase, experts_of, None)
    meta = TraceMeta("toy", "toy", layers, list(range(layers)), experts, k, 0, "test")
    return Trace(meta, [seq])


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize(
    ("scope", "capacity", "batch"),
    [("per-layer", 4, 1), ("per-layer", 7, 3), ("global", 9, 2), ("per-layer", 3, 2), ("global", 30, 4)],
)
def test_compiled_stream_decides_as_the_per_key_hooks(policy, scope, capacity, batch):
    # capacity 3 with steps of up to 2 x 3 experts: many steps are wider than the cache and leave the
    # compiled loop for `account` and back again.
    trace = _trace(seed=capacity, rows=240, layers=3, experts=10, k=3, batch=batch)
    (stream,) = build_replay(trace).streams
    fast = ExpertCacheBook([0, 1, 2], capacity, scope, policy_factory(policy))
    slow = ExpertCacheBook([0, 1, 2], capacity, scope, policy_factory(policy))
    assert all(isinstance(p, RankedPolicy) for p in fast.policies)
    fast.account_stream(stream.calls)
    for layer, keys, now, phase in stream.calls:
        slow.step(layer, [e for _, e in keys], now, phase)
    assert fast.counts == slow.counts
    assert {k: fast.slot_of(k) for k in fast.resident_keys()} == {k: slow.slot_of(k) for k in slow.resident_keys()}
    # The compiled replay leaves the policy where the hooks leave it: the next victims agree.
    for fast_policy, slow_policy in zip(fast.policies, slow.policies, strict=True):
        candidates = {k for k in fast.resident_keys() if scope == "global" or k[0] == next(iter(fast_policy.index))[0]}
        if candidates:
            assert fast_policy.victim(candidates, (0, 99), 10**6) == slow_policy.victim(candidates, (0, 99), 10**6)
    assert 0 < fast.total().hits < fast.total().accesses


def test_a_stream_replayed_twice_reuses_its_arrays_and_counts_the_same():
    trace = _trace(seed=1, rows=100, layers=2, experts=8, k=2, batch=1)
    (stream,) = build_replay(trace).streams
    totals = []
    for _ in range(2):
        book = ExpertCacheBook([0, 1], 3, "per-layer", LRU)
        book.account_stream(stream.calls)
        totals.append(book.total())
    assert totals[0] == totals[1]


def test_other_policies_take_the_python_loop():
    trace = _trace(seed=2, rows=100, layers=2, experts=8, k=2, batch=1)
    (stream,) = build_replay(trace).streams
    a = ExpertCacheBook([0, 1], 3, "per-layer", policy_factory("arc"))
    b = ExpertCacheBook([0, 1], 3, "per-layer", policy_factory("arc"))
    a.account_stream(stream.calls)
    for call in stream.calls:
        b.account(*call)
    assert a.counts == b.counts
