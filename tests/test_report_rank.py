"""The report's ranking: t-intervals over repeats, ties, INVALID runs kept out, results of two machines merged."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from harness.report import build_report
from harness.report.load import find_runs, mark_eligible, runs_frame
from harness.report.rank import Estimate, rank
from harness.results import read_json, write_json_atomic
from harness.spec import RunSpec
from tests import fake_cell

CHROMIUM = Path("/usr/bin/chromium")


def test_estimate_is_the_student_t_interval():
    # mean 2, sample sd 1, n 3: half-width t(0.975, 2) * 1 / sqrt(3) = 4.303 / 1.732.
    e = Estimate.of(pd.Series([1.0, 2.0, 3.0]))
    assert e.mean == 2.0 and e.n == 3
    assert e.half_width == pytest.approx(4.303 / math.sqrt(3))
    single = Estimate.of(pd.Series([5.0]))
    assert single.half_width is None and single.overlaps(e) is None


def _frame(entries: dict[str, list[float]], valid: dict[str, bool] | None = None) -> pd.DataFrame:
    rows = []
    for label, values in entries.items():
        for i, v in enumerate(values):
            ok = (valid or {}).get(label, True)
            rows.append(
                {
                    "machine": "m",
                    "model": "tiny",
                    "device": "nvme0n1",
                    "x_unit": "RAM budget (GiB)",
                    "x": 1.5,
                    "label": label,
                    "repeat": i,
                    "status": "ok",
                    "decode_tokens_per_s": v,
                    "hit_rate_decode": 0.5,
                    "belady_hit_rate_decode": 0.7,
                    "decode_floor_ratio": None,
                    "invalid": not ok,
                }
            )
    return pd.DataFrame(rows)


def test_ranking_names_ties_and_the_margin_over_lru():
    frame = mark_eligible(_frame({"lru": [5.0, 5.1, 4.9], "lfu": [10.0, 10.1, 9.9], "arc": [9.7, 10.1, 9.9]}))
    (row,) = rank(frame)
    assert row.best.label == "lfu" and row.best.tokens_per_s.mean == pytest.approx(10.0)
    assert row.ties == ["arc"]  # 10.0 +- 0.25 and 9.9 +- 0.50 overlap; LRU's 5.0 +- 0.25 does not
    assert "tie with arc" in row.verdict
    assert row.margin_over_lru_pct == pytest.approx(100 * (10.0 / 5.0 - 1))
    assert row.lru_within_noise is False
    assert row.belady_gap_pp == pytest.approx(20.0)


def test_single_runs_are_not_told_apart():
    (row,) = rank(mark_eligible(_frame({"lru": [5.0], "lfu": [6.0]})))
    assert row.best.label == "lfu" and row.ties == [] and row.untold == ["lru"]
    assert "single runs" in row.verdict


def test_invalid_runs_are_left_out_unless_asked_for():
    frame = _frame({"lru": [5.0, 5.1, 4.9], "random": [50.0, 50.0, 50.1]}, valid={"random": False})
    (row,) = rank(mark_eligible(frame.copy()))
    assert row.best.label == "lru" and row.others == []
    (row,) = rank(mark_eligible(frame.copy(), include_invalid=True))
    assert row.best.label == "random"


def _run(root: Path, policy: str, repeat: int) -> Path:
    spec = RunSpec(model="models/fake", ram_budget="512MiB", policy=policy, repeat=repeat)
    spec_file = root / f"{spec.run_id}.json"
    spec_file.write_text(json.dumps(spec.canonical()))
    fake_cell.main(str(spec_file), str(root))
    spec_file.unlink()
    return root / spec.run_id / "result.json"


def _set_machine(folder: Path, hostname: str, fingerprint: str) -> None:
    for path in folder.rglob("result.json"):
        result = read_json(path)
        result["machine"] = {"host": hostname, "fingerprint": fingerprint}
        write_json_atomic(path, result)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two machines that ran the same specs (same run_ids): LRU and LFU x 3 repeats; A also has an INVALID run."""
    a = tmp_path_factory.mktemp("machine-a")
    for policy in ("lru", "lfu"):
        for repeat in range(3):
            _run(a, policy, repeat)
    b = tmp_path_factory.mktemp("machine-b")
    shutil.copytree(a, b, dirs_exist_ok=True)
    invalid = _run(a, "arc", 0)
    result = read_json(invalid)
    result["metrics"]["decode_tokens_per_s"] = 1000.0
    result["validity"] = {"valid": False, "reasons": ["only 3 steady-state decode steps (< 16)"], "suggestions": []}
    write_json_atomic(invalid, result)
    _set_machine(a, "desk-a", "fp-aaaa")
    _set_machine(b, "desk-b", "fp-bbbb")
    return a, b


def test_two_machines_merge_without_collision(lab):
    a, b = lab
    frame = runs_frame(find_runs([a, b]))
    assert len(frame) == 13  # 6 + 6 shared run_ids, + 1 INVALID: nothing dropped as a duplicate
    assert frame["uid"].is_unique and not frame["run_id"].is_unique
    assert set(frame["machine"]) == {"desk-a", "desk-b"}
    rows = rank(mark_eligible(frame))
    assert [r.machine for r in rows] == ["desk-a", "desk-b"]
    assert all(r.best.tokens_per_s.n == 3 and r.best.label != "arc" for r in rows)


def test_report_of_two_machines(lab, tmp_path):
    index = build_report(list(lab), tmp_path)
    html = index.read_text()
    ranking = html[html.index('<table id="ranking">') : html.index("</table>", html.index('<table id="ranking">'))]
    assert ranking.count('class="rank-row"') == 2
    assert "desk-a" in ranking and "desk-b" in ranking and "arc" not in ranking
    invalid = html[html.index('<table id="invalid">') :]
    assert "arc" in invalid.split("</table>")[0]
    # Each machine's detail figures get their own files.
    assert len({p.name for p in tmp_path.glob("timeline-*.png")}) >= 2
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert set(summary["machine"]) == {"desk-a", "desk-b"}
    with_invalid = build_report(list(lab), tmp_path / "all", include_invalid=True).read_text()
    top = with_invalid[with_invalid.index('<table id="ranking">') :].split("</table>")[0]
    assert '<td class="best">arc</td>' in top


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium package (/usr/bin/chromium)")
def test_ranking_table_in_headless_chromium(lab, tmp_path):
    index = build_report(list(lab), tmp_path / "report")
    dom = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",  # root in a container has no user namespace for the sandbox
            "--disable-gpu",
            "--allow-file-access-from-files",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            index.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    table = re.search(r'<table id="ranking">(.*?)</table>', dom, re.S)
    assert table, dom[:500]
    rows = re.findall(r'<tr class="rank-row">(.*?)</tr>', table.group(1), re.S)
    assert len(rows) == 2
    best = [re.search(r'<td class="best">(.*?)</td>', r).group(1) for r in rows]
    assert "arc" not in best and "arc" not in table.group(1)  # the INVALID run is not ranked
    assert all(b in ("lru", "lfu") for b in best)
    invalid = re.search(r'<table id="invalid">(.*?)</table>', dom, re.S)
    assert invalid and "arc" in invalid.group(1)
    assert 'data-images-broken="0"' in dom


def test_report_validates_the_what_if_model(lab, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(lab[1], runs)
    profile = Path(__file__).resolve().parent.parent / "hardware_profiles" / "published" / "samsung-990-pro-2tb.json"
    for path in runs.rglob("result.json"):
        result = read_json(path)
        result["hardware_profile"] = str(profile)
        write_json_atomic(path, result)
    html = build_report([runs], tmp_path / "report").read_text()
    table = html[html.index('<table id="prediction-table">') :].split("</table>")[0]
    assert table.count("samsung-990-pro-2tb.json") == 6  # every plain-cache run predicted
    without = build_report([lab[1]], tmp_path / "plain").read_text()
    assert "no run names an SSD profile" in without
