"""The report's memory-tier section, from synthetic result.json files whose metrics carry `tiers` rows."""

from __future__ import annotations

import csv
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from harness.report import build_report
from harness.report.load import find_runs, mark_eligible, runs_frame, tier_design, tiers_frame
from harness.report.rank import tier_configs
from harness.result_model import RESULT_SCHEMA_VERSION, RunResult, ValidityVerdict

GIB = 2**30
MODEL = "olmoe-small"
# The keys of TierSimulationResult.rows() (harness/trace/simulate_tiers.py) and the live run's additions.
ROW_KEYS = [
    "stack",
    "tier",
    "kind",
    "policy",
    "capacity_slots",
    "scope",
    "modelled",
    "accesses",
    "hits",
    "misses",
    "hit_rate",
    "served_share",
    "edge_below",
    "edge_bytes_per_token",
    "hit_rate_decode",
    "edge_bytes_per_token_decode",
]
PAGECACHE_KEYS = ("live_hits", "live_misses", "live_hit_rate", "model_minus_live_hit_rate")


def _tier(stack: str, i: int, kind: str, policy: str, slots: int, edge: str, **values: float) -> dict[str, Any]:
    modelled = kind == "pagecache"
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS, 0)
    row.update(
        stack=stack,
        tier=i,
        kind=kind,
        policy=policy,
        capacity_slots=slots,
        scope="global" if modelled else "per-layer",
        modelled=modelled,
        edge_below=edge,
    )
    if modelled:
        row.update(dict.fromkeys(PAGECACHE_KEYS, 0))
    row.update(values)
    assert set(row) == set(ROW_KEYS) | (set(PAGECACHE_KEYS) if modelled else set())
    return row


def _write(
    root: Path,
    run_id: str,
    budget_gib: float,
    tokens_per_s: float,
    ssd_bytes_per_token: float,
    tiers: str | None,
    rows: list[dict[str, Any]],
    repeat: int = 0,
    valid: bool = True,
) -> None:
    spec = {"model": f"models/{MODEL}", "ram_budget": f"{budget_gib}GiB", "policy": "lru", "repeat": repeat}
    if tiers is not None:
        spec["tiers"] = tiers
    result = RunResult(
        schema_version=RESULT_SCHEMA_VERSION,
        run_id=run_id,
        status="ok",
        spec=spec,
        machine={"host": "box", "fingerprint": "f00"},
        resolved={"model_name": MODEL, "ram_budget_bytes": int(budget_gib * GIB), "scope": "per-layer"},
        metrics={
            "decode_tokens_per_s": tokens_per_s,
            "ssd_read_bytes_per_token": ssd_bytes_per_token,
            "ttft_s": {"p50": 0.5},
            "token_latency_s": {"p50": 1 / tokens_per_s, "p99": 1.5 / tokens_per_s},
            "hit_rate_decode": rows[0]["hit_rate_decode"] if rows else 0.5,
            **({"tiers": rows} if rows else {}),
        },
        storage={"disk": "nvme0n1"},
        validity=ValidityVerdict(valid=valid, reasons=[] if valid else ["too short"]),
    )
    result.save(root / run_id)


SLOTS = "host:lru:19"
BOTH = "host:lru:9,pagecache:120"
PAGE = "pagecache:228"


def _slots(stack: str, hit: float, edge: float) -> list[dict[str, Any]]:
    return [_tier(stack, 0, "host", "lru", int(stack.rsplit(":", 1)[1]), "host->ssd", **_rates(hit, edge))]


def _rates(hit_decode: float, edge_decode: float, **more: float) -> dict[str, float]:
    return {"hit_rate_decode": hit_decode, "edge_bytes_per_token_decode": edge_decode, **more}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """At 1.5 GiB: slots only (2 runs), slots over the page cache (2 runs), page cache only (1 valid, 1 INVALID)
    and one plain LRU cache run; at 2 GiB: slots only (2 runs)."""
    root = tmp_path_factory.mktemp("tier-results")
    _write(root, "a0", 1.5, 10.0, 60e6, SLOTS, _slots(SLOTS, 0.60, 60e6))
    _write(root, "a1", 1.5, 12.0, 70e6, SLOTS, _slots(SLOTS, 0.70, 70e6), repeat=1)
    for run_id, repeat, tps, ssd, host, page, model, live in (
        ("b0", 0, 14.0, 30e6, 0.40, 0.30, 0.35, 0.25),
        ("b1", 1, 15.0, 40e6, 0.50, 0.40, 0.45, 0.30),
    ):
        rows = [
            _tier(BOTH, 0, "host", "lru", 9, "host->pagecache", served_share=host, **_rates(host, 2 * ssd)),
            _tier(
                BOTH,
                1,
                "pagecache",
                "kernel",
                120,
                "pagecache->ssd",
                hit_rate=model,
                live_hit_rate=live,
                model_minus_live_hit_rate=model - live,
                **_rates(page, ssd),
            ),
        ]
        _write(root, run_id, 1.5, tps, ssd, BOTH, rows, repeat=repeat)
    page_rows = [_tier(PAGE, 0, "pagecache", "kernel", 228, "pagecache->ssd", hit_rate=0.5, live_hit_rate=0.5)]
    _write(root, "c0", 1.5, 8.0, 50e6, PAGE, page_rows)
    _write(root, "c1", 1.5, 99.0, 1e6, PAGE, page_rows, repeat=1, valid=False)
    _write(root, "plain", 1.5, 9.0, 80e6, None, [])
    wide = "host:lru:33"
    _write(root, "d0", 2.0, 20.0, 20e6, wide, _slots(wide, 0.8, 20e6))
    _write(root, "d1", 2.0, 22.0, 22e6, wide, _slots(wide, 0.8, 22e6), repeat=1)
    return root


def test_designs_name_a_stack_without_its_capacities():
    assert tier_design("host:lru:16") == "host:lru"
    assert tier_design("host:lru:16,pagecache:512") == "host:lru over pagecache"
    assert tier_design("device:lfu:8,host:lru:16") == "device:lfu over host:lru"
    assert tier_design("not a stack") == "not a stack"


def test_tier_configurations_are_ranked_per_budget_with_their_tiers(results):
    runs = find_runs([results])
    frame = mark_eligible(runs_frame(runs))
    tiers = tiers_frame(runs, frame)
    assert len(tiers) == 2 + 4 + 2 + 2  # tier rows of every tier run, the INVALID one's included (not eligible)
    configs = tier_configs(frame, tiers)
    at_15 = [c for c in configs if c.x == 1.5]
    # Fastest first; the INVALID page-cache run (99 tok/s) is left out, the plain LRU run is no tier configuration.
    assert [c.design for c in at_15] == ["host:lru over pagecache", "host:lru", "pagecache"]
    both, slots, page = at_15
    assert both.stacks == [BOTH] and both.tokens_per_s.n == 2
    assert both.tokens_per_s.mean == pytest.approx(14.5)
    # t(0.975, 1) * sd([14, 15]) / sqrt(2) = 12.706 * 0.7071 / 1.4142
    assert both.tokens_per_s.half_width == pytest.approx(12.706 * 0.5)
    assert both.ssd_read_bytes_per_token == pytest.approx(35e6)
    host, pagecache = both.tiers
    assert (host.kind, host.capacity_slots, host.edge_below) == ("host", 9, "host->pagecache")
    assert host.hit_rate_decode == pytest.approx(0.45)
    assert host.served_share == pytest.approx(0.45)
    assert host.edge_bytes_per_token_decode == pytest.approx(70e6)
    assert host.live_hit_rate is None
    assert both.pagecache == [pagecache]
    assert pagecache.hit_rate_decode == pytest.approx(0.35)
    assert pagecache.hit_rate == pytest.approx(0.40)
    assert pagecache.live_hit_rate == pytest.approx(0.275)
    assert pagecache.model_minus_live_hit_rate == pytest.approx(0.125)
    assert slots.tokens_per_s.mean == pytest.approx(11.0) and slots.tiers[0].hit_rate_decode == pytest.approx(0.65)
    assert page.tokens_per_s.n == 1 and page.tokens_per_s.mean == 8.0
    (wide,) = [c for c in configs if c.x == 2.0]
    assert wide.design == "host:lru" and wide.tokens_per_s.mean == pytest.approx(21.0)


class _Tables(HTMLParser):
    """The text of every cell of every table with an id, by table id."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._table = dict(attrs).get("id")
            if self._table:
                self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._table and self._cell is not None:
            self.tables[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _tables(index: Path) -> dict[str, list[dict[str, str]]]:
    parser = _Tables()
    parser.feed(index.read_text())
    return {name: [dict(zip(rows[0], r, strict=True)) for r in rows[1:]] for name, rows in parser.tables.items()}


def test_report_renders_the_tier_tables_and_figures(results, tmp_path):
    index = build_report([results], tmp_path)
    tables = _tables(index)
    configs = [
        (r["budget"], r["configuration"], r["decode tok/s (runs)"], r["SSD B/token"]) for r in tables["tier-configs"]
    ]
    assert configs == [
        ("1.5 GiB RAM", "host:lru over pagecache", "14.5 ± 6.4 (n=2)", "33.38 MiB"),  # 35e6 B
        ("1.5 GiB RAM", "host:lru", "11 ± 13 (n=2)", "61.99 MiB"),  # 65e6 B; 12.706 * sd([10, 12]) / sqrt(2)
        ("1.5 GiB RAM", "pagecache", "8 (n=1)", "47.68 MiB"),
        ("2 GiB RAM", "host:lru", "21 ± 13 (n=2)", "20.03 MiB"),  # 21e6 B
    ]
    tier_rows = [
        (r["configuration"], r["kind"], r["slots"], r["decode hit rate"], r["B/decode token across it"])
        for r in tables["tier-rows"]
    ]
    assert tier_rows[:3] == [
        ("host:lru over pagecache", "host", "9", "0.45", "66.76 MiB"),  # 70e6 B
        ("host:lru over pagecache", "pagecache", "120", "0.35", "33.38 MiB"),
        ("host:lru", "host", "19", "0.65", "61.99 MiB"),
    ]
    live = [
        (r["configuration"], r["model hit rate"], r["live hit rate"], r["model − live"])
        for r in tables["pagecache-live"]
    ]
    assert live == [("host:lru over pagecache", "0.4", "0.275", "0.125"), ("pagecache", "0.5", "0.5", "0")]
    text = index.read_text()
    assert 'src="tier_hit_rate.png"' in text and 'src="tier_edge_bytes.png"' in text
    assert (tmp_path / "tier_hit_rate.png").is_file() and (tmp_path / "tier_edge_bytes.png").is_file()
    with open(tmp_path / "tiers.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 10
    # The ranking tells designs apart (all of them have policy lru) and keeps the plain cache run as `lru`.
    ranking = tables["ranking"]
    assert [r["best"] for r in ranking] == ["host:lru over pagecache", "host:lru"]
    assert "lru 9 (n=1)" in ranking[0]["others (tok/s)"]


def test_results_without_tiers_have_no_tier_section(results, tmp_path):
    plain = tmp_path / "plain-only"
    shutil.copytree(results / "plain", plain / "plain")
    index = build_report([plain], tmp_path / "report")
    text = index.read_text()
    assert 'id="tiers-title"' not in text and "tier_hit_rate" not in text
    assert not (tmp_path / "report" / "tiers.csv").exists()
