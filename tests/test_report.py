"""`harness report`: DataFrame, PNGs, summary.csv and index.html from result folders; the page in headless Chromium."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import pytest
import yaml
from click.testing import CliRunner

from harness.cli import main as cli_main
from harness.report import build_report
from harness.report.load import find_runs, runs_frame
from harness.spec import RunSpec
from harness.sweep import SweepRunner, expand, load_sweep
from tests import fake_cell

CHROMIUM = Path("/usr/bin/chromium")
FAKE_CELL = [sys.executable, str(Path(fake_cell.__file__)), "{spec}", "{results}"]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four ok runs (2 policies x 2 budgets) written in-process, and one crashed cell run through the sweep."""
    root = tmp_path_factory.mktemp("report-results")
    for budget in ("256MiB", "512MiB"):
        for policy in ("lru", "lfu"):
            spec = RunSpec(model="models/fake", ram_budget=budget, policy=policy)
            spec_file = root / f"{spec.run_id}.json"
            spec_file.write_text(json.dumps(spec.canonical()))
            fake_cell.main(str(spec_file), str(root))
            spec_file.unlink()
    sweep_file = root / "crash.yaml"
    sweep_file.write_text(yaml.safe_dump({"base": {"model": "models/fake", "policy": "fake-crash"}, "drop_caches": 0}))
    sweep = load_sweep(sweep_file)
    SweepRunner(sweep, root, command=FAKE_CELL).run(expand(sweep))
    sweep_file.unlink()
    return root


@pytest.fixture(scope="module")
def report(results: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_report([results], tmp_path_factory.mktemp("report")).parent


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.sources.append(dict(attrs)["src"] or "")


def _image_sources(index: Path) -> list[str]:
    parser = _Images()
    parser.feed(index.read_text())
    return parser.sources


def test_frame_has_one_row_per_run_with_failures_kept(results):
    frame = runs_frame(find_runs([results]))
    assert len(frame) == 5
    assert sorted(frame["status"]) == ["failed", "ok", "ok", "ok", "ok"]
    failed = frame[frame["status"] == "failed"].iloc[0]
    assert failed["error"].startswith("exited with status 1")
    ok = frame[frame["status"] == "ok"]
    assert set(ok["ram_budget_bytes"]) == {256 * 2**20, 512 * 2**20}
    assert set(ok["label"]) == {"lru", "lfu"}


def test_report_writes_every_figure_and_the_csv(report):
    index = report / "index.html"
    sources = _image_sources(index)
    for name in ("throughput.png", "hit_rate.png", "ssd_bytes.png", "latency.png"):
        assert name in sources
    assert any(s.startswith("timeline-") for s in sources)
    assert any(s.startswith("heatmap-") for s in sources)
    for source in sources:
        assert (report / source).is_file(), source
        assert not Path(source).is_absolute()  # the page must open from any folder, images beside it
    with open(report / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5
    ok = [r for r in rows if r["status"] == "ok"]
    # Belady's bound replayed from each ok run's trace, a hit rate in [0, 1].
    assert all(0.0 <= float(r["belady_hit_rate_decode"]) <= 1.0 for r in ok)
    assert "not drawn" not in index.read_text().lower()


def test_missing_simulator_shows_bound_unavailable(results, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "harness.trace.simulate", None)
    index = build_report([results], tmp_path)
    assert "bound unavailable" in index.read_text()
    with open(tmp_path / "summary.csv") as handle:
        assert all(not r["belady_hit_rate_decode"] for r in csv.DictReader(handle))


def test_cli_report_and_its_errors(results, tmp_path):
    out = CliRunner().invoke(cli_main, ["report", str(results), "--out", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "r" / "index.html").is_file()
    missing = CliRunner().invoke(cli_main, ["report", str(tmp_path / "absent"), "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    (tmp_path / "empty").mkdir()
    empty = CliRunner().invoke(cli_main, ["report", str(tmp_path / "empty"), "--out", str(tmp_path / "y")])
    assert empty.exit_code == 2 and "no result.json" in empty.output


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium package (/usr/bin/chromium)")
def test_report_page_loads_in_headless_chromium(report, tmp_path):
    index = report / "index.html"
    base = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-gpu",
        "--allow-file-access-from-files",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
    ]
    dom = subprocess.run(
        [*base, "--dump-dom", index.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    images = int(re.search(r'data-images="(\d+)"', body.group(1)).group(1))
    broken = int(re.search(r'data-images-broken="(\d+)"', body.group(1)).group(1))
    assert images == len(_image_sources(index)) >= 6
    assert broken == 0
    assert "Decode tokens/s vs RAM budget" in dom

    shot = tmp_path / "shot.png"
    subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1280,1600", index.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = matplotlib.image.imread(shot)
    # A blank page is one flat colour; the report's plots and text are not.
    assert pixels[..., :3].std() > 0.05
