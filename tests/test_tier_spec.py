"""The `tiers` field of a run spec: one-line errors for bad stacks, plan-time checks of top-k and of the
page-cache classification, and the run id (tiers enter it; a spec without tiers keeps its old one)."""

import os

import pytest

from harness.cache.tiers import TierSpec
from harness.errors import HarnessError
from harness.spec import RunSpec, check_tiers, load_run_spec


@pytest.mark.parametrize(
    ("tiers", "extra", "message"),
    [
        ("gpu:lru:8", {}, "unknown tier kind 'gpu'"),
        ("device:nope:8", {}, "unknown policy 'nope'"),
        ("host:lru:8", {"cache_experts": "8"}, "tiers name each tier's capacity: drop cache_experts"),
        ("host:lru:8,pagecache:64", {"io_engine": "direct"}, "a page-cache tier needs buffered reads"),
        ("device:lru:8,host:lfu:32", {"strategy": "prefetch"}, "tiers run with strategy cache only"),
    ],
)
def test_spec_tiers_errors_are_one_line(tiers, extra, message):
    with pytest.raises(HarnessError, match=message) as caught:
        load_run_spec({"model": "m", "tiers": tiers, **extra})
    assert "\n" not in str(caught.value)


def test_a_spec_without_tiers_keeps_its_run_id():
    spec = RunSpec(model="m")
    assert spec.tiers is None and "tiers" not in spec.canonical()
    tiered = RunSpec(model="m", tiers="host:lru:8")
    assert tiered.canonical() == {**spec.canonical(), "tiers": "host:lru:8"}


def test_plan_time_checks(tmp_path):
    experts = tmp_path / "experts.bin"
    experts.write_bytes(os.urandom(8192))
    assert check_tiers("device:lru:4,host:lfu:16,pagecache:64", 4, experts) == [
        TierSpec("device", "lru", 4),
        TierSpec("host", "lfu", 16),
        TierSpec("pagecache", "kernel", 64),
    ]
    with pytest.raises(HarnessError, match="tier device:lru:4 holds 4 slots, fewer than the model's top-8"):
        check_tiers("device:lru:4,host:lfu:16", 8, experts)
    check_tiers("host:lru:8", 8, tmp_path / "missing.bin")  # no page-cache tier: the file is not probed
    with pytest.raises(HarnessError, match=r"a page-cache tier needs reads classified .* but cannot open"):
        check_tiers("host:lru:8,pagecache:64", 8, tmp_path / "missing.bin")


def test_a_page_cache_tier_is_refused_where_reads_cannot_be_classified(tmp_path, monkeypatch):
    experts = tmp_path / "experts.bin"
    experts.write_bytes(b"x" * 4096)
    monkeypatch.delattr(os, "RWF_NOWAIT")
    with pytest.raises(HarnessError, match="needs reads classified as page cache or device, but this system has no"):
        check_tiers("pagecache:64", 8, experts)


def test_tiers_are_a_sweep_axis():
    from harness.sweep import SweepSpec, expand

    sweep = SweepSpec(base={"model": "m"}, matrix={"tiers": [None, "host:lru:4,pagecache:64"]})
    plain, tiered = expand(sweep)
    assert plain.spec.canonical() == RunSpec(model="m").canonical()
    assert tiered.spec.tiers == "host:lru:4,pagecache:64" and tiered.spec.canonical()["tiers"] == tiered.spec.tiers
