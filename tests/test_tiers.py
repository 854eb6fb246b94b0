"""Tier stacks: parsing with one-line errors, one tier equal to the single-cache simulator exactly, a
hand-computed two-tier replay, the FLAME slice against an independent two-level LRU, `simulate --tiers`."""

import json
from collections import OrderedDict

import pytest
from click.testing import CliRunner

from harness.cache.tiers import (
    TierSpec,
    TierStack,
    check_tiers_budget,
    check_tiers_fit,
    parse_tiers,
    tier_ram_bytes,
)
from harness.cli import main
from harness.errors import HarnessError
from harness.trace.schema import read_trace
from harness.trace.simulate import build_replay, run_replay
from harness.trace.simulate_tiers import run_tier_replay
from tests import test_simulate as sim
from tests.test_simulate import GOLDEN, flame_steps

toy = sim.toy  # fixtures of the simulator's tests: the hand-made two-layer trace, the FLAME slice
flame = sim.flame


def counts_of(counts) -> dict:
    return {(p, layer): (c.hits, c.misses) for p, per_layer in counts.items() for layer, c in per_layer.items()}


def test_parse_tiers():
    assert parse_tiers("device:lru:48, host:lfu-window:128:256 ,pagecache:4096") == [
        TierSpec("device", "lru", 48),
        TierSpec("host", "lfu-window:128", 256),
        TierSpec("pagecache", "kernel", 4096),
    ]
    (page,) = parse_tiers("pagecache:kernel:64")
    assert page.modelled and page.label == "pagecache:kernel:64"
    assert not parse_tiers("host:lru:8")[0].modelled


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gpu:lru:8", "unknown tier kind 'gpu' in 'gpu:lru:8': use device, host, pagecache"),
        ("device:nope:8", "unknown policy 'nope'"),
        ("device:lru", "cannot read tier 'device:lru': use device:POLICY:SLOTS"),
        ("device:lru:many", "cannot read the capacity of tier 'device:lru:many'"),
        ("host:lru:0", "tier 'host:lru:0' has no slot"),
        ("host:kernel:8", "only the page cache is kept by the kernel"),
        ("pagecache:lru:8", "the kernel keeps the page cache; write pagecache:EXPERTS"),
        ("host:lru:8,device:lru:4", "each kind at most once, top to bottom"),
        ("host:lru:8,host:lfu:4", "each kind at most once"),
        ("host:lfu-window:x:8", "lfu-window"),
        (" , ", "no tier given"),
    ],
)
def test_parse_tiers_errors_are_one_line(text, message):
    with pytest.raises(HarnessError, match=message.replace("(", r"\(")) as caught:
        parse_tiers(text)
    assert "\n" not in str(caught.value)


def test_capacity_below_top_k_is_refused():
    check_tiers_fit(parse_tiers("device:lru:2,pagecache:1"), top_k=2)  # the page cache is not slots
    with pytest.raises(HarnessError, match="tier host:lru:3 holds 3 slots, fewer than the model's top-4 experts"):
        check_tiers_fit(parse_tiers("device:lru:8,host:lru:3"), top_k=4)


def test_tiers_that_do_not_fit_the_ram_budget_are_refused():
    tiers = parse_tiers("device:lru:2,host:lru:4,pagecache:16")
    mib = 2**20
    # 8 layers, per-layer scope: device 2*8, host 4*8 slots, the page cache 16 experts in all.
    assert tier_ram_bytes(tiers, mib, 8, "per-layer", "cpu") == (16 + 32 + 16) * mib
    assert tier_ram_bytes(tiers, mib, 8, "per-layer", "cuda") == (32 + 16) * mib  # device slots are VRAM
    assert tier_ram_bytes(tiers, mib, 8, "global", "cpu") == (2 + 4 + 16) * mib
    check_tiers_budget(tiers, mib, 8, "per-layer", "cpu", 64 * mib)
    with pytest.raises(HarnessError, match="hold 64 MiB of experts in RAM, but the RAM budget leaves 63 MiB"):
        check_tiers_budget(tiers, mib, 8, "per-layer", "cpu", 63 * mib)


SLOT_POLICIES = ["lru", "lfu", "arc", "lecar", "random", "fwlru", "lrfu", "lrfu-admit", "sieve", "s3fifo", "layer-lru"]


@pytest.mark.parametrize("policy", [*SLOT_POLICIES, "belady"])
@pytest.mark.parametrize("capacity", [1, 2, 3, 8])
@pytest.mark.parametrize("scope", ["per-layer", "global"])
def test_one_tier_is_the_single_cache_exactly(toy, policy, capacity, scope):
    replay = build_replay(read_trace(toy))
    single = run_replay(replay, policy, capacity, scope)
    stacked = run_tier_replay(replay, [TierSpec("host", policy, capacity)], scope)
    assert counts_of(stacked.counts[0]) == counts_of(single.counts)
    assert stacked.ssd_reads == single.total().misses
    assert stacked.edge_bytes_per_token(0) == single.bytes_read_per_token()
    if policy != "belady":
        # In a stack the top tier goes through the book's `step` (plans), not the replay path: same counts.
        top = run_tier_replay(replay, [TierSpec("device", policy, capacity), TierSpec("host", "lru", 2)], scope)
        assert counts_of(top.counts[0]) == counts_of(single.counts)


def test_two_tiers_hand_computed(toy):
    replay = build_replay(read_trace(toy))
    result = run_tier_replay(replay, parse_tiers("device:lru:2,host:lru:3"))
    # Layer 0, steps {0,1,2} {0,2,3} {0,1,2}. Device (2 slots): 0,1 in, 2 streamed; then 0 hits, 2 evicts 1,
    # 3 streamed; then 0,2 hit, 1 streamed: 3 hits, 6 misses. The host sees only those misses, {0,1,2}
    # {2,3} {1}: 3 misses; 2 hits, 3 evicts 0 (least recent: device hits never reach the host); 1 hits.
    # Layer 1, steps {4,5,6} {4,7} {5,6,7}. Device: 4,5 in, 6 streamed; 4 hits, 7 evicts 5; 7 hits, 5
    # evicts 4, 6 streamed: 2 hits, 6 misses. Host sees {4,5,6} {7} {5,6}: 3 misses; 7 evicts 4; 5,6 hit.
    assert counts_of(result.counts[0]) == {
        ("prefill", 0): (0, 3),
        ("prefill", 1): (0, 3),
        ("decode", 0): (3, 3),
        ("decode", 1): (2, 3),
    }
    assert counts_of(result.counts[1]) == {
        ("prefill", 0): (0, 3),
        ("prefill", 1): (0, 3),
        ("decode", 0): (2, 1),
        ("decode", 1): (2, 1),
    }
    assert result.ssd_reads == 8 and result.edges == ["host->device", "ssd->host"]
    assert result.served_share(0) == pytest.approx(5 / 17) and result.served_share(1) == pytest.approx(4 / 17)
    # 12 experts cross host->device and 8 cross ssd->host, 1000 bytes each, over 6 token rows.
    assert result.edge_bytes_per_token(0) == pytest.approx(12_000 / 6)
    assert result.edge_bytes_per_token(1) == pytest.approx(8_000 / 6)


def test_page_cache_model_is_one_lru_over_all_layers(toy):
    replay = build_replay(read_trace(toy))
    # Room for all 8 distinct experts: the page cache misses each once and serves every other device miss.
    roomy = run_tier_replay(replay, parse_tiers("device:lru:2,pagecache:8"))
    assert (roomy.total(1).hits, roomy.total(1).misses) == (4, 8)
    assert roomy.rows()[1]["scope"] == "global" and roomy.rows()[1]["modelled"] is True
    # One LRU over both layers: with 3 experts in all, each layer's device misses ({0,1,2} {4,5,6} {2,3} {7}
    # {1} {5,6}) evict the other layer's, so nothing hits; a per-layer host of 3 slots hit 4 times.
    tight = run_tier_replay(replay, parse_tiers("device:lru:2,pagecache:3"))
    assert (tight.total(1).hits, tight.total(1).misses) == (0, 12)


def test_step_plans_say_which_tier_served_each_expert():
    stack = TierStack([0], parse_tiers("device:lru:2,host:lru:4"))
    first = stack.step(0, [1, 2], now=0)
    assert len(first) == 2 and [k for k, _ in first[1].loads] == [(0, 1), (0, 2)]  # both from the SSD
    stack.step(0, [3, 4], now=1)  # device now holds 3, 4; the host 1, 2, 3, 4
    device, host = stack.step(0, [1, 3], now=2)
    assert [k for k, _ in device.hits] == [(0, 3)] and [k for k, _ in device.loads] == [(0, 1)]
    assert [k for k, _ in host.hits] == [(0, 1)] and not host.loads  # served by the host, copied up
    assert len(stack.step(0, [1, 3], now=3)) == 1  # both on the device: the host is not reached


def test_an_oracle_is_a_single_tier_only():
    with pytest.raises(HarnessError, match="device:belady:2: an oracle reads the future"):
        TierStack([0], parse_tiers("device:belady:2,host:lru:4"))


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_a_ranked_policy_keeps_the_stamp_of_the_key_that_grows_its_state(policy):
    # Found by a page-cache tier (one LRU over more experts than a layer has): the 65th key grows the state
    # array, and its stamp used to be written into the old one (out of bounds in compiled code).
    from harness.cache.registry import policy_factory

    ranked = policy_factory(policy)(100)
    for e in range(65):
        ranked.on_insert((0, e), e)
    assert ranked.victim({(0, e) for e in range(1, 65)}, (0, 99), 65) == (0, 1)


def two_level_lru(steps: list[list[int]], device: int, host: int) -> tuple[int, int]:
    """Independent two-level LRU (not the product code): the host sees the device's misses; hits are
    refreshed first, then misses come in, in expert order. Returns (device hits, host hits)."""
    levels = [(OrderedDict(), device), (OrderedDict(), host)]
    hits = [0, 0]
    for step in steps:
        wanted = step
        for i, (cache, capacity) in enumerate(levels):
            present = [e for e in wanted if e in cache]
            hits[i] += len(present)
            for e in present:
                cache.move_to_end(e)
            missed = [e for e in wanted if e not in cache]
            for e in missed:
                if len(cache) >= capacity:
                    cache.popitem(last=False)
                cache[e] = None
            wanted = missed
    return hits[0], hits[1]


def test_flame_one_tier_golden_and_two_tiers_against_reference(flame):
    replay = build_replay(flame)
    for (policy, capacity), hits in GOLDEN.items():
        assert run_tier_replay(replay, [TierSpec("device", policy, capacity)]).total(0).hits == hits
    # The page cache is one LRU over both layers' 128 experts; as the top tier it goes through `step`.
    pagecache = run_tier_replay(replay, parse_tiers("device:lru:64,pagecache:32"), scope="global")
    assert counts_of(pagecache.counts[0]) == counts_of(run_replay(replay, "lru", 64, "global").counts)
    result = run_tier_replay(replay, parse_tiers("device:lru:8,host:lru:32"))
    assert result.total(0).hits == GOLDEN["lru", 8]  # the top tier does not see the tiers below it
    for i, layer in enumerate(flame.meta.moe_layers):
        device_hits, host_hits = two_level_lru(flame_steps(flame, i), 8, 32)
        assert (result.total(0, layer=layer).hits, result.total(1, layer=layer).hits) == (device_hits, host_hits)


def test_cli_simulate_tiers(toy, tmp_path):
    out = tmp_path / "out"
    args = ["simulate", "--trace", str(toy), "--tiers", "device:lru:2,host:lru:3", "--tiers", "host:lru:3"]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "misses from" in result.output and "0.2941" in result.output and "0.4118" in result.output
    summary = json.loads((out / "tiers.json").read_text())
    rows = [(r["stack"], r["kind"], r["hits"], r["misses"]) for r in summary["tiers"]]
    assert rows == [
        ("device:lru:2,host:lru:3", "device", 5, 12),
        ("device:lru:2,host:lru:3", "host", 4, 8),
        ("host:lru:3", "host", 7, 10),  # as `simulate --policy lru --capacity 3`
    ]
    assert (out / "tiers.csv").read_text().splitlines()[0].startswith("stack,tier,kind,policy,capacity_slots")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tiers", "gpu:lru:2"], "error: unknown tier kind 'gpu'"),
        (
            ["--tiers", "host:lru:2", "--policy", "lfu"],
            "error: --tiers sets each tier's policy and size, over all steps: drop --policy",
        ),
    ],
)
def test_cli_tier_errors_are_one_line_exit_2(toy, extra, message):
    result = CliRunner().invoke(main, ["simulate", "--trace", str(toy), *extra])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and result.output.startswith(message)
