"""`lrfu-prior`, a candidate for the held-out goal: hand-computed victims and admissions of its rule (CRF at lambda 0.02
plus 10 steps of the profiled rate), and the same decisions through the live engine's per-key hooks, the
compiled replay and the simulator."""

from pathlib import Path

import pytest

from harness.benchmarks.heldout_policies import COMPARED, format_rows, heldout_rows
from harness.cache.book import ExpertCacheBook
from harness.cache.policies.lrfu_prior import DEFAULT_DECAY, PRIOR_STEPS
from harness.cache.profile import FrequencyProfile
from harness.cache.registry import policy_factory
from harness.errors import HarnessError
from harness.trace.importers import import_flame
from harness.trace.schema import read_trace
from harness.trace.simulate import build_replay, profile_of, run_replay
from tests.test_policies import random_trace
from tests.test_policy_frontier import evicted, replay
from tests.test_split import write

PRIOR = "lrfu-prior"
FLAME = Path(__file__).with_name("data") / "flame-moe-290m"


def test_it_is_compared_with_the_goal_policy_with_its_documented_constants():
    assert COMPARED == ("lrfu-prior",) and (DEFAULT_DECAY, PRIOR_STEPS) == (0.02, 10.0)


def test_the_prior_overrules_recency_where_the_profile_knows_better():
    # Capacity 2; t2 needs 2. CRF at t2 (lambda 0.02): expert 0 (used t0) 2^-0.04 = 0.973, expert 1 (t1)
    # 2^-0.02 = 0.986. The profile gives 0 a rate of 5/10 = 0.5, so a prior of 10 x 0.5 = 5: 0 is worth 5.973
    # and 1 (rate 0) 0.986: 1 leaves. Without a profile it is LRFU: 0 (the smaller CRF) leaves.
    profile = FrequencyProfile({(0, 0): 5}, {0: 10})
    steps = [[0], [1], [2]]
    assert evicted(replay("lrfu-prior", steps, 2, profile=profile)[1]) == [[], [], [1]]
    assert evicted(replay("lrfu-prior", steps, 2)[1]) == [[], [], [0]]


def test_a_miss_streams_until_its_own_count_outweighs_the_victims_prior():
    # Capacity 2, both residents profiled at 0.5 (prior 5 each); 2 (unprofiled) is needed from t2 on. After n
    # accesses in a row 2's CRF is (1 - 2^(-0.02 n)) / (1 - 2^-0.02); the victim is 0 (last used t0),
    # worth 5 + 2^(-0.02 t). t7 (n = 6): 5.80 < 5.91, streamed; t8 (n = 7): 6.72 >= 5.89: 2 replaces 0.
    profile = FrequencyProfile({(0, 0): 5, (0, 1): 5}, {0: 10})
    steps = [[0], [1]] + [[2]] * 8
    book, plans = replay("lrfu-prior", steps, 2, profile=profile)
    assert [[e for _, e in p.streamed] for p in plans] == [[], [], *[[2]] * 6, [], []]
    assert evicted(plans) == [[]] * 8 + [[0], []]
    assert (book.total().hits, book.total().misses) == (1, 9)
    # With no profile the first miss of 2 is admitted (CRF 1 >= 0's 0.973): 7 hits of 2 from t3 on.
    book, plans = replay("lrfu-prior", steps, 2)
    assert evicted(plans)[2] == [0] and book.total().hits == 7


def test_without_a_profile_it_decides_as_lrfu_admit_at_its_lambda():
    (stream,) = build_replay(random_trace(3, seqs=1, rows=150, experts=10, k=3)).streams
    specs = ("lrfu-prior", "lrfu-admit:0.02")
    books = [ExpertCacheBook([0, 1], 4, "per-layer", policy_factory(spec)) for spec in specs]
    for book in books:
        book.account_stream(stream.calls)
    assert books[0].counts == books[1].counts


def test_a_missing_profile_trace_is_one_clear_error(tmp_path):
    with pytest.raises(HarnessError, match="lrfu-prior: profile trace"):
        policy_factory(f"lrfu-prior:{tmp_path / 'none.parquet'}")(2)


@pytest.fixture(scope="module")
def flame(tmp_path_factory):
    path = tmp_path_factory.mktemp("flame") / "flame.parquet"
    import_flame(sorted(FLAME.glob("*.pt")), path, sequence_length=128)
    return path


@pytest.mark.parametrize(("scope", "capacity"), [("per-layer", 16), ("per-layer", 3), ("global", 40)])
def test_engine_hooks_compiled_replay_and_simulator_decide_alike(flame, scope, capacity):
    # Training part: the first 2 sequences; scored: the rest. The engine's per-key hooks (`step`), the compiled
    # replay (`account_stream`) and `run_replay` end with the same slots and counts.
    trace = read_trace(flame)
    train = build_replay(trace, sequences=[0, 1])
    profile = profile_of(train, "training part")
    scored = build_replay(trace, sequences=[2, 3, 4])
    (stream,) = scored.streams
    layers = list(trace.meta.moe_layers)
    hooks, fast = (ExpertCacheBook(layers, capacity, scope, policy_factory(PRIOR, profile=profile)) for _ in range(2))
    for layer, keys, now, phase in stream.calls:
        hooks.step(layer, [e for _, e in keys], now, phase)
    fast.account_stream(stream.calls)
    assert hooks.counts == fast.counts
    assert {k: hooks.slot_of(k) for k in hooks.resident_keys()} == {k: fast.slot_of(k) for k in fast.resident_keys()}
    simulated = run_replay(scored, PRIOR, capacity, scope, profile=profile)
    assert simulated.total() == hooks.total() and 0 < hooks.total().hits < hooks.total().accesses
    assert simulated.description["profile"] == "training part"


def test_heldout_rows_show_the_compared_policies_beside_the_goal(tmp_path):
    # Training (seq 0): 0 and 1 alternate. Held out (seq 1): 2, 3, 0, 2, 3, 0 with 1 slot. lrfu-prior: t0 fills
    # the slot with 2; t1: 3 (CRF 1, prior 0) >= 2 (2^-0.02): 3 replaces 2; t2: 0 (1 + prior 10 x 3/5) replaces 3
    # and stays (2 and 3 never outweigh it): one hit, at t5.
    path = write(tmp_path / "t.parquet", {0: [[0], [1], [0], [1], [0]], 1: [[2], [3], [0], [2], [3], [0]]})
    (row,) = heldout_rows("toy", path, "seq:1", PRIOR, "1", "per-layer", heuristics=("lru",), compared=("lrfu",))
    assert (row.best_name, row.best, row.goal) == ("lru", 0.0, 1 / 6)
    assert row.compared == {"lrfu": 0.0}
    head, _, line = format_rows([row], PRIOR)
    assert head.split()[5:9] == [PRIOR, "lead", "pt", "lrfu"] and line.split()[5:8] == ["0.1667", "+16.67", "0.0000"]
