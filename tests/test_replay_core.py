"""The compiled replay (every policy's compiled kernel) decides as the per-key hooks
do: same slots, same counts."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from numba.core.caching import NullCache

from harness.cache.base import CachePolicy
from harness.cache.book import ExpertCacheBook
from harness.cache.compiled import CompiledPolicy, driver, mt_below, mt_random, mt_state
from harness.cache.learned import FlashMoEModel, TrainSettings, build_model
from harness.cache.policies.lru import LRU
from harness.cache.policies.sieve import Sieve
from harness.cache.registry import policy_factory
from harness.keys import ExpertKey
from harness.trace.importers import import_flame
from harness.trace.schema import SequenceRouting, Trace, TraceMeta, read_trace
from harness.trace.simulate import Stream, build_replay, profile_of
from harness.trace.train import layer_streams

FLAME = Path(__file__).with_name("data") / "flame-moe-290m"
COMPILED = [
    "lru",
    "lfu",
    "fwlru",
    "fwlru:2.5",
    "lrfu",
    "lrfu:0.3",
    "lrfu-admit",
    "lrfu-prior",
    "sieve",
    "s3fifo",
    "arc",
    "belady",
    "belady-bypass",
    "static-oracle",
    "static",
    "least-stale",
    "layer-lru",
    "lecar",
    "random",
    "lfu-window:8",
    "reuse-logit",
    "flashmoe",
]


def _flashmoe_model(stream: Stream, layers: list[int]) -> FlashMoEModel:
    """A FlashMoE network per layer, trained briefly on the stream's own steps (any weights will do)."""
    experts = 1 + max(e for _, keys, _, _ in stream.calls for _, e in keys)
    steps = layer_streams(SimpleNamespace(layers=layers, streams=[stream]))  # type: ignore[arg-type]
    return build_model(steps, experts, TrainSettings(max_epochs=1, seed=0), {"trace": "test"})


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


def _compare(policy: str, layers: list[int], stream: Stream, scope: str, capacity: int, context: dict) -> None:
    """The compiled stream and the per-key hooks (`step`, as the live engine calls them) end alike."""
    if policy.startswith(("belady", "static-oracle")):
        context = {**context, "future": stream.future()}
    if policy == "flashmoe":
        context = {**context, "flashmoe_model": _flashmoe_model(stream, layers)}
    fast = ExpertCacheBook(layers, capacity, scope, policy_factory(policy, 5, **context))
    slow = ExpertCacheBook(layers, capacity, scope, policy_factory(policy, 5, **context))
    compiled = all(isinstance(p, CompiledPolicy) for p in fast.policies)
    assert compiled == (policy in COMPILED)
    fast.account_stream(stream.calls)
    for layer, keys, now, phase in stream.calls:
        slow.step(layer, [e for _, e in keys], now, phase)
    assert fast.counts == slow.counts
    assert {k: fast.slot_of(k) for k in fast.resident_keys()} == {k: slow.slot_of(k) for k in slow.resident_keys()}
    # The compiled replay leaves the policy where the hooks leave it: the next victims agree.
    for fast_policy, slow_policy in zip(fast.policies, slow.policies, strict=True):
        if not compiled:
            continue
        candidates = {k for k in fast.resident_keys() if scope == "global" or k[0] == next(iter(fast_policy.index))[0]}
        if candidates:
            layer = min(k[0] for k in candidates)
            # A key not seen before; flashmoe knows only its model's experts: one of them that is not resident.
            spare = {99} if policy != "flashmoe" else set(range(fast_policy.model.num_experts))
            spare -= {e for lay, e in candidates if lay == layer}
            if not spare:
                continue
            incoming = (layer, min(spare))
            assert fast_policy.victim(candidates, incoming, 10**6) == slow_policy.victim(candidates, incoming, 10**6)
    assert 0 < fast.total().hits < fast.total().accesses


@pytest.mark.parametrize("policy", COMPILED)
@pytest.mark.parametrize(
    ("scope", "capacity", "batch"),
    [("per-layer", 4, 1), ("per-layer", 7, 3), ("global", 9, 2), ("per-layer", 3, 2), ("global", 30, 4)],
)
def test_compiled_stream_decides_as_the_per_key_hooks(policy, scope, capacity, batch):
    # capacity 3 with steps of up to 2 x 3 experts: many steps are wider than the cache and leave the
    # compiled loop for `account` and back again.
    replay = build_replay(_trace(seed=capacity, rows=240, layers=3, experts=10, k=3, batch=batch))
    (stream,) = replay.streams
    _compare(policy, [0, 1, 2], stream, scope, capacity, {"profile": profile_of(replay)})


@pytest.fixture(scope="module")
def flame_stream(tmp_path_factory):
    """The first 1,500 calls of the FLAME slice (sequences of 128 tokens; steps up to 6 x 2 experts per layer)."""
    path = tmp_path_factory.mktemp("flame") / "flame.parquet"
    import_flame(sorted(FLAME.glob("*.pt")), path, sequence_length=128)
    trace = read_trace(path)
    replay = build_replay(trace)
    (stream,) = replay.streams
    return list(trace.meta.moe_layers), Stream(stream.seq_ids, stream.calls[:1500], stream.tokens), profile_of(replay)


@pytest.mark.parametrize("policy", COMPILED)
@pytest.mark.parametrize(("scope", "capacity"), [("per-layer", 16), ("per-layer", 5), ("global", 40)])
def test_compiled_flame_stream_decides_as_the_per_key_hooks(policy, scope, capacity, flame_stream):
    layers, stream, profile = flame_stream
    _compare(policy, layers, stream, scope, capacity, {"profile": profile})


def test_a_stream_replayed_twice_reuses_its_arrays_and_counts_the_same():
    trace = _trace(seed=1, rows=100, layers=2, experts=8, k=2, batch=1)
    (stream,) = build_replay(trace).streams
    totals = []
    for _ in range(2):
        book = ExpertCacheBook([0, 1], 3, "per-layer", LRU)
        book.account_stream(stream.calls)
        totals.append(book.total())
    assert totals[0] == totals[1]


class _PlainLRU(CachePolicy):
    """A policy of Python hooks only (no compiled replay)."""

    name = "plain-lru"
    observes_misses = False

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, seed)
        self.last: dict[ExpertKey, int] = {}
        self.clock = 0

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        self.clock += 1
        self.last[key] = self.clock

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self.on_access(key, now, True)

    def victim(self, candidates, incoming: ExpertKey, now: int) -> ExpertKey:
        return min(candidates, key=lambda k: (self.last[k], k))


def test_other_policies_take_the_python_loop():
    trace = _trace(seed=2, rows=100, layers=2, experts=8, k=2, batch=1)
    (stream,) = build_replay(trace).streams
    a = ExpertCacheBook([0, 1], 3, "per-layer", _PlainLRU)
    b = ExpertCacheBook([0, 1], 3, "per-layer", _PlainLRU)
    a.account_stream(stream.calls)
    for call in stream.calls:
        b.account(*call)
    assert a.counts == b.counts and 0 < a.total().hits < a.total().accesses


class _OwnSieve(Sieve):
    """A policy class outside the harness package, on the harness's SIEVE kernel."""


def test_each_policy_class_replays_through_its_own_compiled_loop():
    # One copy of `drive` per class, named after its module and class; cached on disk only for the harness's own
    # classes (the cache folder is named by the harness's sources, not by a kernel edited elsewhere).
    assert driver(Sieve) is driver(Sieve) and driver(_OwnSieve) is not driver(Sieve)
    assert driver(Sieve).py_func.__name__ == "drive_harness_cache_policies_sieve_Sieve"
    assert driver(_OwnSieve).py_func.__name__.endswith("test_replay_core__OwnSieve")
    assert not isinstance(driver(Sieve)._cache, NullCache) and isinstance(driver(_OwnSieve)._cache, NullCache)
    trace = _trace(seed=2, rows=100, layers=2, experts=8, k=2, batch=1)
    (stream,) = build_replay(trace).streams
    books = [ExpertCacheBook([0, 1], 3, "per-layer", cls) for cls in (Sieve, _OwnSieve)]
    for book in books:
        book.account_stream(stream.calls)
    assert books[0].counts == books[1].counts and 0 < books[0].total().hits < books[0].total().accesses


@pytest.mark.parametrize("seed", [0, 5, 2**40 + 3])
def test_the_compiled_generator_draws_what_cpython_draws(seed):
    # `random` and `lecar` draw from compiled Mersenne Twister state seeded as random.Random(seed): the
    # victims are the ones the policies drew from random.Random itself.
    reference = random.Random(seed)
    state = np.array([-1, *mt_state(seed)], dtype=np.int64)  # the generator may start anywhere in the globals
    for i in range(1500):  # past one twist of the 624-word state
        if i % 2:
            assert mt_random(state, 1) == reference.random()
        else:
            n = 1 + i % 41
            assert mt_below(state, 1, n) == reference._randbelow(n)


@pytest.mark.parametrize("candidates", [5, 32, 33, 50, 257])
def test_random_evicts_the_drawn_rank_of_the_sorted_candidates(candidates):
    # The drawn rank is found by counting smaller keys up to 32 candidates and by quickselect beyond; one
    # candidate more than the capacity takes arrays of its own instead of the globals' scratch. Either way
    # the victim is the one random.Random(seed) draws from the sorted candidates.
    policy = policy_factory("random", 7)(candidates - 1)
    keys = {(1, e) for e in range(0, 3 * (candidates - 1), 3)} | {(0, 5)}
    reference = random.Random(7)
    for _ in range(20):
        expected = sorted(keys)[reference.randrange(len(keys))]
        assert policy.victim(keys, (2, 0), 0) == expected
