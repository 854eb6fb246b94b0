"""Every registered policy: hand-computed victims, determinism, capacity, and Belady never beaten."""

import numpy as np
import pytest

from harness.cache.base import CachePolicy
from harness.cache.book import ExpertCacheBook
from harness.cache.policies.belady import FutureAccesses
from harness.cache.policies.lfu import LFU
from harness.cache.policies.lru import LRU
from harness.cache.profile import FrequencyProfile
from harness.cache.registry import policy_class, policy_factory, policy_names
from harness.errors import HarnessError
from harness.trace.schema import SequenceRouting, Trace, TraceMeta
from harness.trace.simulate import build_replay, run_replay

ONLINE = [
    "lru",
    "lfu",
    "lfu-window:4",
    "arc",
    "lecar",
    "random",
    "fwlru",
    "lrfu",
    "lrfu:0.5",
    "lrfu-admit",
    "lrfu-prior",
    "reuse-logit",
    "sieve",
    "s3fifo",
    "least-stale",
    "layer-lru",
]
ORACLES = ["belady", "belady-bypass", "static-oracle"]
PROFILE = FrequencyProfile({(layer, e): (e * 7) % 5 for layer in (0, 1) for e in range(12)}, {0: 20, 1: 20})
"""A frequency profile for `static` (the profile-based policy) in the property tests."""


def single_layer_replay(policy: str, steps: list[list[int]], capacity: int):
    """Replay steps of layer 0 (step i at now = i) through a book; oracles get the future of these steps."""
    future = FutureAccesses({})
    for now, experts in enumerate(steps):
        for e in sorted(set(experts)):
            future.times.setdefault((0, e), []).append(now)
    book = ExpertCacheBook([0], capacity, "per-layer", policy_factory(policy, future=future))
    plans = [book.step(0, experts, now) for now, experts in enumerate(steps)]
    return book, plans


STEPS = [[0], [1], [2], [0], [1], [3], [0]]


def test_belady_victims_by_hand():
    # t2: 0 is next used at t3, 1 at t4: evict 1. t4: 2 is never used again: evict it. t5: 1 never again.
    book, plans = single_layer_replay("belady", STEPS, capacity=2)
    assert [p.evicted for p in plans] == [[], [], [(0, 1)], [], [(0, 2)], [(0, 1)], []]
    assert (book.total().hits, book.total().misses) == (2, 5)


def test_belady_bypass_streams_what_is_needed_later_than_everything_resident():
    book, plans = single_layer_replay("belady-bypass", STEPS, capacity=2)
    assert [p.streamed for p in plans] == [[], [], [(0, 2)], [], [], [(0, 3)], []]
    assert (book.total().hits, book.total().misses) == (3, 4)


def test_lru_and_lfu_by_hand_on_the_same_steps():
    lru, _ = single_layer_replay("lru", STEPS, capacity=2)
    assert lru.total().hits == 0
    # LFU keeps 0 (3 uses by t6) where LRU drops it: steps where frequency pays.
    book, plans = single_layer_replay("lfu", [[0], [0], [1], [2], [0], [1], [2], [0]], capacity=2)
    # t3: 1 (count 1) leaves; t5: 2 (count 1) leaves; t6: 1 (count 2, used t5) vs 0 (count 3): 1 leaves.
    assert [p.evicted for p in plans] == [[], [], [], [(0, 1)], [], [(0, 2)], [(0, 1)], []]
    assert book.total().hits == 3


def test_lfu_ties_go_to_the_least_recently_used():
    # t0: {1, 2} inserted. t1: 2 hit (count 2), 3 inserted (count 1). t2 needs 4: candidates 1 (count 1,
    # last t0) and 2 (count 2): 1 leaves. t3 needs 5: candidates 2 (2), 3 (1, t1): 3 leaves.
    _, plans = single_layer_replay("lfu", [[1, 2], [2, 3], [4], [5]], capacity=3)
    assert [p.evicted for p in plans] == [[], [], [(0, 1)], [(0, 3)]]
    # Same count, same step: the hit (touched first) is older than the inserted miss, whatever the ids.
    _, plans = single_layer_replay("lfu", [[5], [5, 0], [9], [7], [8]], capacity=3)
    # counts after t2: 5 -> 2, 0 -> 1, 9 -> 1. t3 needs 7: 0 (t1) older than 9 (t2): 0 leaves. t4: 9 vs 7 -> 9.
    assert [p.evicted for p in plans][3:] == [[(0, 0)], [(0, 9)]]


def test_arc_moves_reused_keys_to_t2_and_adapts_on_ghost_hits():
    book, plans = single_layer_replay("arc", [[0], [0], [1], [2], [1], [3], [2]], capacity=2)
    # t2 fills; t3: T1=[1], T2=[0], p=0 -> evict LRU of T1 = 1 (ghost B1). t4: 1 is a B1 ghost hit: p=1,
    # it enters T2; victim: |T1|=1 (key 2) not > p=1 -> LRU of T2 = 0. t5: 3 new; T1=[2] > p? no -> T2: 1.
    assert [p.evicted for p in plans] == [[], [], [], [(0, 1)], [(0, 0)], [(0, 1)], []]
    arc = book.policies[0]
    assert arc.p == 1.0 and book.total().hits == 2


def test_lfu_hooks_called_between_steps_see_every_resident_key():
    # An engine may ask for a victim (prefetch) or drop a key between steps: the last step's keys count.
    lfu = LFU(3)
    book = ExpertCacheBook([0], 3, "per-layer", lambda capacity: lfu)
    book.step(0, [1, 2], 0)
    book.step(0, [1, 3], 1)
    # counts: 1 -> 2, 2 -> 1 (used t0), 3 -> 1 (used t1): 2 leaves first, then 3.
    assert lfu.victim({(0, 1), (0, 2), (0, 3)}, (0, 4), 2) == (0, 2)
    lfu.on_evict((0, 3), 2)
    assert lfu.victim({(0, 1), (0, 2)}, (0, 4), 2) == (0, 2)
    lfu.on_evict((0, 2), 2)
    book2 = LFU(2)
    book2.on_insert((0, 7), 0)  # placed outside a step, then dropped before the next one
    book2.on_evict((0, 7), 0)
    book2.on_insert((0, 8), 1)
    assert book2.victim({(0, 8)}, (0, 9), 1) == (0, 8)  # the dropped key is no candidate, nor in the way


@pytest.mark.parametrize("policy", ["belady", "belady-bypass"])
def test_oracles_are_refused_without_a_future(policy):
    assert policy_class(policy).needs_future
    with pytest.raises(HarnessError, match="only in `harness simulate`"):
        policy_factory(policy)(4)


def test_flashmoe_without_a_model_is_a_clear_error():
    with pytest.raises(HarnessError, match="flashmoe needs a model"):
        policy_factory("flashmoe")(4)
    with pytest.raises(HarnessError, match="does not exist"):
        policy_factory("flashmoe:/nonexistent/model.pt")(4)


def test_every_policy_is_registered():
    assert set(policy_names()) >= {
        "lru",
        "lfu",
        "lfu-window",
        "arc",
        "lecar",
        "random",
        "belady",
        "belady-bypass",
        "flashmoe",
        "fwlru",
        "lrfu",
        "lrfu-admit",
        "reuse-logit",
        "sieve",
        "s3fifo",
        "least-stale",
        "layer-lru",
        "static",
        "static-oracle",
    }


def random_trace(seed: int, seqs: int = 2, rows: int = 60, layers: int = 2, experts: int = 10, k: int = 3) -> Trace:
    """Skewed random routing: expert e drawn with weight 1/(e+1), k distinct per row."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, experts + 1)
    p /= p.sum()
    sequences = []
    for s in range(seqs):
        ex = np.array([[rng.choice(experts, k, replace=False, p=p) for _ in range(layers)] for _ in range(rows)])
        step = np.arange(s * rows, (s + 1) * rows, dtype=np.int32)
        sequences.append(
            SequenceRouting(s, step, np.arange(rows, dtype=np.int32), np.ones(rows, np.int8), ex.astype(np.int16), None)
        )
    meta = TraceMeta("toy", "toy", layers, list(range(layers)), experts, k, 0, "random test trace")
    return Trace(meta, sequences)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scope", ["per-layer", "global"])
def test_belady_is_never_beaten(seed, scope):
    replay = build_replay(random_trace(seed), "all", "never")
    for capacity in (3, 4, 6) if scope == "per-layer" else (4, 8, 12):
        forced = run_replay(replay, "belady", capacity, scope).total().hits
        bypass = run_replay(replay, "belady-bypass", capacity, scope).total().hits
        assert forced <= bypass
        for policy in [*ONLINE, "static-oracle"]:
            hits = run_replay(replay, policy, capacity, scope, seed=seed).total().hits
            # A policy that may stream a miss (admission) is bounded by the bypass variant only.
            bound = bypass if policy_class(policy).admit is not CachePolicy.admit else forced
            assert hits <= bound, (policy, capacity, hits, bound)


@pytest.mark.parametrize("policy", [*ONLINE, *ORACLES, "static"])
def test_capacity_holds_victims_are_resident_and_same_seed_same_decisions(policy):
    trace = random_trace(11, seqs=1, rows=80)
    replay = build_replay(trace)
    (stream,) = replay.streams

    def run():
        make = policy_factory(policy, 7, future=stream.future(), profile=PROFILE)
        book = ExpertCacheBook(replay.layers, 4, "per-layer", make)
        evictions = []
        for layer, keys, now, phase in stream.calls:
            before = book.resident_keys()
            plan = book.step(layer, [e for _, e in keys], now, phase)
            assert all(v in before and v[0] == layer and v not in keys for v in plan.evicted)
            assert all(len([k for k in book.resident_keys() if k[0] == lay]) <= 4 for lay in replay.layers)
            evictions.append(plan.evicted)
        return evictions

    assert run() == run()


class _UnfusedLRU(LRU):
    replace = CachePolicy.replace


class _UnfusedLFU(LFU):
    replace = CachePolicy.replace


@pytest.mark.parametrize(("fused", "unfused"), [(LRU, _UnfusedLRU), (LFU, _UnfusedLFU)])
def test_fused_replace_decides_as_victim_evict_insert(fused, unfused):
    trace = random_trace(3, seqs=1, rows=200, experts=12)
    (stream,) = build_replay(trace).streams
    for scope, capacity in (("per-layer", 4), ("global", 7)):
        books = [ExpertCacheBook([0, 1], capacity, scope, cls) for cls in (fused, unfused)]
        for layer, keys, now, phase in stream.calls:
            a, b = (book.step(layer, [e for _, e in keys], now, phase) for book in books)
            assert a.evicted == b.evicted and a.loads == b.loads


@pytest.mark.parametrize("policy", [*ONLINE, *ORACLES, "static"])
def test_replay_batch_calls_decide_as_the_per_key_loop(policy):
    # `account` (replay) uses replay_step once the cache is full; `step` calls the per-key
    # hooks. Both must leave the same keys in the same slots after every step, and count the same hits.
    trace = random_trace(5, seqs=1, rows=300, layers=2, experts=12, k=4)
    (stream,) = build_replay(trace).streams
    for scope, capacity in (("per-layer", 5), ("global", 9), ("per-layer", 3)):
        books = [
            ExpertCacheBook([0, 1], capacity, scope, policy_factory(policy, 3, future=stream.future(), profile=PROFILE))
            for _ in range(2)
        ]
        for layer, keys, now, phase in stream.calls:
            books[0].account(layer, keys, now, phase)
            books[1].step(layer, [e for _, e in keys], now, phase)
            slots = [{key: book.slot_of(key) for key in book.resident_keys()} for book in books]
            assert slots[0] == slots[1], (scope, capacity, now)
        assert books[0].total() == books[1].total()
        assert 0 < books[0].total().hits < books[0].total().accesses


class _ReferenceLFU(CachePolicy):
    """LFU as documented, done the plain way: the victim is the candidate with the lowest (count, placement),
    found by a scan; a step's keys wait in `pending` and are numbered when the next step starts (or when a
    victim is asked for)."""

    name = "lfu-reference"

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, seed)
        self.count: dict = {}
        self.placed: dict = {}  # key -> placement number
        self.pending: list = []
        self.clock = 0

    def _place(self) -> None:
        for key in self.pending:
            self.placed[key] = self.clock
            self.clock += 1
        self.pending.clear()

    def on_step(self, layer, now):
        self._place()

    def on_access(self, key, now, hit):
        self.count[key] = self.count.get(key, 0) + 1
        if hit:
            del self.placed[key]
            self.pending.append(key)

    def on_insert(self, key, now):
        self.pending.append(key)

    def victim(self, candidates, incoming, now):
        self._place()
        return min((k for k in self.placed if k in candidates), key=lambda k: (self.count.get(k, 0), self.placed[k]))

    def on_evict(self, key, now):
        if self.placed.pop(key, None) is None:
            self.pending.remove(key)


@pytest.mark.parametrize("scope", ["per-layer", "global"])
def test_lfu_decides_as_the_plain_reference(scope):
    # LFU ranks by (count, stamp) in compiled functions. Replay steps, per-key steps, prefetches, placements
    # and drops must leave every key where the plain reference puts it, and every victim asked for between
    # steps must be the same.
    for seed in range(8):
        rng = np.random.default_rng(seed)
        experts = int(rng.integers(4, 13))
        weights = 1.0 / np.arange(1, experts + 1)  # expert e drawn with weight 1/(e+1): counts grow apart
        capacity = int(rng.integers(2, experts)) * (2 if scope == "global" else 1)
        books = [ExpertCacheBook([0, 1], capacity, scope, cls) for cls in (_ReferenceLFU, LFU)]
        for now in range(300):
            layer = int(rng.integers(2))
            needed = rng.choice(experts, int(rng.integers(1, 7)), p=weights / weights.sum())
            keys = tuple((layer, int(e)) for e in sorted(set(needed)))
            op, prefetch = rng.random(), rng.random() < 0.3
            results = []
            for book in books:
                if prefetch:  # staged, then used by the step: a miss placed before the step's later hits
                    plan = book.prefetch(layer, [e for _, e in keys][:2], now)
                    results.append((plan.hits, plan.loads, plan.evicted))
                if op < 0.45:
                    book.account(layer, keys, now)
                elif op < 0.9:
                    plan = book.step(layer, [e for _, e in keys], now)
                    results.append((plan.hits, plan.loads, plan.evicted, plan.streamed, plan.dropped))
                elif op < 0.95:
                    results.append(book.discard(keys[0], now))
                else:
                    results.append(book.place(keys[-1], now))
            assert results[: len(results) // 2] == results[len(results) // 2 :], (seed, now)
            slots = [{key: book.slot_of(key) for key in book.resident_keys()} for book in books]
            assert slots[0] == slots[1], (seed, now)
            # Layer 0's policy (the only one in global scope) asked for a victim among its resident keys.
            candidates = {key for key in slots[0] if scope == "global" or key[0] == 0}
            if now % 7 == 0 and candidates:
                victims = [book.policies[0].victim(candidates, (0, 99), now) for book in books]
                assert victims[0] == victims[1], (seed, now)


@pytest.mark.parametrize("policy", ONLINE)
def test_policies_survive_the_engines_calls_between_steps(policy):
    # The live engine also prefetches (victim + on_evict between steps), places experts without an
    # access (on_insert) and drops them (on_evict of a key no policy chose).
    if not all(hasattr(ExpertCacheBook, name) for name in ("prefetch", "place", "discard")):
        pytest.skip("this ExpertCacheBook has no prefetch/place/discard")
    rng = np.random.default_rng(1)
    book = ExpertCacheBook([0, 1], 3, "per-layer", policy_factory(policy, 1))
    for now in range(300):
        for layer in (0, 1):
            if rng.random() < 0.3:
                book.prefetch(layer, rng.choice(8, 2, replace=False).tolist(), now)
            book.step(layer, rng.choice(8, 2, replace=False).tolist(), now)
            if rng.random() < 0.1 and book.resident_keys():
                book.discard(sorted(book.resident_keys())[int(rng.integers(len(book.resident_keys())))], now)
            if rng.random() < 0.1:
                book.place((layer, int(rng.integers(8))), now)
    assert book.total().accesses == 1200
