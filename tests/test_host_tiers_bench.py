"""The host-tier benchmark's sizing rule, cell order, table and command line (no run: it needs the tier engine)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.benchmarks import host_tiers
from harness.benchmarks.host_tiers import DESIGNS, Design, designs, main, plan_cells, render, table
from harness.errors import HarnessError
from harness.store.layout import PackIndex
from harness.units import parse_size
from harness.workloads import PACKAGED_WORKLOADS

MIB = 2**20
STRIDE = 3 * MIB
# olmoe-small's pack (models/olmoe-small/packed/index.json): 12 MoE layers of 64 experts of 3 MiB, top-8,
# 135890944 B of non-expert weights.
OLMOE_SMALL = PackIndex(
    model_type="olmoe",
    dtype="bfloat16",
    num_experts=64,
    top_k=8,
    moe_layers=list(range(12)),
    expert_bytes=STRIDE,
    stride_bytes=STRIDE,
    tensors=[],
    entries=[],
    dense_bytes=135890944,
    source_fingerprint={},
    source_config={},
    dense_xxh3="",
)
# Reserve: dense 135890944 + runtime 520 MiB + workspace 256 MiB + 4 read buffers of 3 MiB + slack 32 MiB
# = 995723264 B; slots per layer = (budget - reserve) // (12 x 3 MiB = 37748736 B).
EXPECTED = {
    "1.25GiB": ["host:lru:9", "pagecache:108", "host:lru:8,pagecache:12"],  # 346454016 // 37748736 = 9; H = 8 (top-k)
    "1.5GiB": ["host:lru:16", "pagecache:192", "host:lru:8,pagecache:96"],  # 614889472 // 37748736 = 16; H = 8
    "2GiB": ["host:lru:30", "pagecache:360", "host:lru:15,pagecache:180"],  # 1151760384 // 37748736 = 30; H = 15
}


def test_designs_hold_the_same_expert_ram_at_each_budget():
    for budget, stacks in EXPECTED.items():
        found = designs(parse_size(budget), OLMOE_SMALL)
        assert [d.tiers for d in found] == stacks
        assert [d.name for d in found] == list(DESIGNS)
        assert [d.io_engine for d in found] == ["direct", "buffered", "buffered"]
    with pytest.raises(HarnessError, match="fewer than the model's top-8"):
        designs(parse_size("1GiB"), OLMOE_SMALL)  # (1073741824 - 995723264) // 37748736 = 2 slots per layer
    # 8 slots per layer: slots over the page cache would leave the page cache nothing, so it is left out.
    eight = 995723264 + 8 * 37748736
    assert [d.tiers for d in designs(eight, OLMOE_SMALL)] == ["host:lru:8", "pagecache:96"]
    # A budget that holds every expert: 64 slots per layer in each design, 32 of them host slots in the last.
    assert [d.tiers for d in designs(parse_size("8GiB"), OLMOE_SMALL)] == [
        "host:lru:64",
        "pagecache:768",
        "host:lru:32,pagecache:384",
    ]


def test_hierarchy_sweep_holds_the_benchmark_designs():
    """workloads/sweeps/hierarchy.yaml lists exactly the designs the benchmark derives for olmoe-small."""
    import yaml

    sweep = yaml.safe_load((PACKAGED_WORKLOADS / "sweeps" / "hierarchy.yaml").read_text())
    assert sweep["base"]["model"] == "models/olmoe-small"
    assert sorted(sweep["matrix"]["ram_budget"]) == sorted(EXPECTED)
    assert sorted(sweep["matrix"]["tiers"]) == sorted(s for stacks in EXPECTED.values() for s in stacks)
    from harness.sweep import expand, load_sweep

    cells = expand(load_sweep(PACKAGED_WORKLOADS / "sweeps" / "hierarchy.yaml"))
    assert len(cells) == 9 * sweep["repeats"]
    configs = {(c.spec.ram_budget, c.spec.tiers, c.spec.io_engine) for c in cells}
    engines = dict(zip(EXPECTED["1.5GiB"], ["direct", "buffered", "buffered"], strict=True))
    assert configs == {
        (budget, stack, engines[EXPECTED["1.5GiB"][i]])
        for budget, stacks in EXPECTED.items()
        for i, stack in enumerate(stacks)
    }
    first = [(c.spec.ram_budget, c.spec.tiers) for c in cells if c.round == 0]
    second = [(c.spec.ram_budget, c.spec.tiers) for c in cells if c.round == 1]
    assert second == first[::-1]  # repeats interleaved in rounds, the second reversed


def _result(tps: float, ssd: float, tiers: list[dict], status: str = "ok", valid: bool = True) -> dict:
    return {
        "status": status,
        "error": None if status == "ok" else "boom",
        "validity": {"valid": valid},
        "metrics": {"decode_tokens_per_s": tps, "ssd_read_bytes_per_token": ssd, "tiers": tiers}
        if status == "ok"
        else None,
    }


def _host(rate: float) -> dict:
    return {"kind": "host", "modelled": False, "hit_rate_decode": rate}


def _page(rate: float, model: float, live: float) -> dict:
    return {
        "kind": "pagecache",
        "modelled": True,
        "hit_rate_decode": rate,
        "hit_rate": model,
        "live_hit_rate": live,
        "model_minus_live_hit_rate": model - live,
    }


def test_table_means_over_rounds_per_budget_and_design():
    b1, b2 = parse_size("1.25GiB"), parse_size("2GiB")
    slots = Design(DESIGNS[0], "host:lru:12", "direct")
    page = Design(DESIGNS[1], "pagecache:144", "buffered")
    both = Design(DESIGNS[2], "host:lru:8,pagecache:48", "buffered")
    wide = Design(DESIGNS[0], "host:lru:33", "direct")
    cells = [  # run order, interleaved: the table sorts by budget, then design
        (b2, wide, _result(20.0, 10e6, [_host(0.9)])),
        (b1, both, _result(6.0, 40e6, [_host(0.5), _page(0.2, 0.25, 0.20)])),
        (b1, page, _result(5.0, 50e6, [_page(0.4, 0.45, 0.30)], valid=False)),
        (b1, slots, _result(7.0, 60e6, [_host(0.6)])),
        (b1, slots, _result(9.0, 40e6, [_host(0.7)])),
        (b1, page, _result(0.0, 0.0, [], status="failed")),
        (b1, both, _result(8.0, 30e6, [_host(0.7), _page(0.4, 0.35, 0.20)])),
    ]
    rows = table(cells)
    assert [(r.budget_bytes, r.design) for r in rows] == [
        (b1, DESIGNS[0]),
        (b1, DESIGNS[1]),
        (b1, DESIGNS[2]),
        (b2, DESIGNS[0]),
    ]
    s, p, b, w = rows
    assert (s.runs, s.tokens_per_s, s.tokens_per_s_by_round) == (2, 8.0, [7.0, 9.0])
    assert s.tier_hit_rate_decode == {"host": pytest.approx(0.65)}
    assert s.ssd_read_bytes_per_token == pytest.approx(50e6)
    assert s.pagecache_live_hit_rate is None and s.failures == []
    assert (p.runs, p.invalid, p.failures, p.tokens_per_s) == (1, 1, ["boom"], 5.0)
    assert p.pagecache_model_minus_live == pytest.approx(0.15)
    assert b.tier_hit_rate_decode == {"host": pytest.approx(0.6), "pagecache": pytest.approx(0.3)}
    assert b.pagecache_model_hit_rate == pytest.approx(0.30)
    assert b.pagecache_live_hit_rate == pytest.approx(0.20)
    assert b.pagecache_model_minus_live == pytest.approx(0.10)
    assert b.ssd_read_bytes_per_token == pytest.approx(35e6)
    assert w.tokens_per_s == 20.0
    text = render(rows)
    line = next(x for x in text.splitlines() if "host:lru:8,pagecache:48" in x)
    assert "7.00" in line and "host 0.600 pagecache 0.300" in line and "35.0" in line and "0.300/0.200/0.100" in line
    assert "failed: boom" in text and "1 (1 INVALID)" in text
    json.dumps([asdict(r) for r in rows])  # --json prints these


def _fake_model(tmp_path: Path) -> Path:
    """A folder holding only a pack index shaped like olmoe-small (no config.json: nothing to pack or run)."""
    packed = tmp_path / "olmoe-fake" / "packed"
    packed.mkdir(parents=True)
    (packed / "index.json").write_text(json.dumps(asdict(OLMOE_SMALL)))
    return packed.parent


def test_plan_interleaves_rounds(tmp_path):
    model = str(_fake_model(tmp_path))
    base = {"max_prompts": 2, "max_new_tokens": 40, "io_threads": 4}
    cells = plan_cells(model, ["1.25GiB", "2GiB"], OLMOE_SMALL, 2, base)
    order = [(rnd, spec.ram_budget, spec.tiers) for rnd, _, _, spec in cells]
    first = [(b, t) for b in ("1.25GiB", "2GiB") for t in EXPECTED[b]]
    assert order == [(0, b, t) for b, t in first] + [(1, b, t) for b, t in first[::-1]]
    assert all(spec.repeat == rnd and spec.max_new_tokens == 40 for rnd, _, _, spec in cells)


def test_command_line_errors_are_one_line_with_exit_2(tmp_path, monkeypatch):
    # The command sizes designs with the runtime it measures; pinned to the shipped sizing's, so stacks are known.
    monkeypatch.setattr(host_tiers, "cell_runtime_bytes", lambda: host_tiers.RUNTIME_RSS_BYTES)
    model = str(_fake_model(tmp_path))
    bad = CliRunner().invoke(main, ["--model", model, "--budgets", "lots"])
    assert bad.exit_code == 2 and bad.output.strip().startswith("error: cannot read size 'lots'")
    small = CliRunner().invoke(main, ["--model", model, "--budgets", "1GiB"])
    assert small.exit_code == 2 and "fewer than the model's top-8" in small.output
    missing = CliRunner().invoke(main, ["--model", str(tmp_path / "absent"), "--budgets", "2GiB"])
    assert missing.exit_code == 2 and len(missing.output.strip().splitlines()) == 1
    rounds = CliRunner().invoke(main, ["--model", model, "--rounds", "0"])
    assert rounds.exit_code == 2 and "--rounds" in rounds.output
    dry = CliRunner().invoke(main, ["--model", model, "--budgets", "2GiB", "--rounds", "2", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert len(dry.output.strip().splitlines()) == 6 and "host:lru:15,pagecache:180" in dry.output
