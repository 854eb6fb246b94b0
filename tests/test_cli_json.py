"""`--json`: one strict JSON document on stdout, the same figures the tables show."""

from __future__ import annotations

import json

from click.testing import CliRunner

from harness.cli import main
from harness.trace.schema import read_trace
from harness.trace.simulate import simulate
from tests.test_learned import write_random_trace


def _json(*args: object) -> dict:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_simulate_json(tmp_path):
    trace = write_random_trace(tmp_path / "t.parquet")
    doc = _json("simulate", "--trace", trace, "--policy", "lru", "--capacity", "2,4", "--json", "--out", tmp_path / "o")
    overall = {
        (r["policy"], r["capacity_slots"]): r["hits"]
        for r in doc["results"]
        if r["layer"] == "all" and r["counted_phase"] == "all"
    }
    expected = read_trace(trace)
    assert overall[("lru", 2)] == simulate(expected, "lru", 2).total().hits
    assert {(p, c) for p in ("lru", "belady", "belady-bypass") for c in (2, 4)} <= set(overall)
    assert doc["trace_meta"]["num_experts"] == 8
    assert any(path.endswith("simulation.json") for path in doc["written"])


def test_trace_info_json(tmp_path):
    trace = write_random_trace(tmp_path / "t.parquet", seqs=2, rows=10)
    doc = _json("trace", "info", "--json", trace)
    assert (doc["sequences"], doc["rows"], doc["layers"]) == (2, 20, [0, 1])
    assert [layer["layer"] for layer in doc["per_layer"]] == [0, 1]


def test_profile_ssd_json(tmp_path):
    args = ["profile-ssd", "--path", tmp_path, "--size", "1MiB", "--block-size", "64KiB", "--queue-depth", "1"]
    args += ["--runtime", "0.05s", "--ramp", "0s", "--min-ios", "4", "--no-buffered", "--direct", "auto"]
    doc = _json(*args, "--out", tmp_path / "p.json", "--json")
    assert doc["profile_path"] == str(tmp_path / "p.json")
    assert doc["jobs"] and all(job["bw_bytes_per_s"] > 0 for job in doc["jobs"])
