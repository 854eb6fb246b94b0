"""`harness predict`: replay misses x the profile's read time + compute time, on a case computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import main as cli_main
from harness.predict import ComputeTime, compute_from_result, predict, validate
from harness.results import read_json, write_json_atomic
from harness.ssd.readtime import ReadTimeModel
from harness.trace.schema import TraceMeta, TraceWriter, read_trace
from harness.trace.simulate import build_replay

MIB = 2**20
BW = 100e6  # bytes/s of the synthetic profile, at every block size and depth
PUBLISHED = Path(__file__).resolve().parent.parent / "hardware_profiles" / "published"


def _profile(path: Path) -> Path:
    job = {"engine": "harness", "rw": "randread", "bs_bytes": MIB, "iodepth": 1, "direct": True, "ios": 1}
    doc = {"schema": "harness.ssd-profile", "effective": {"direct": True}, "jobs": [{**job, "bw_bytes_per_s": BW}]}
    path.write_text(json.dumps(doc))
    return path


def _trace(path: Path) -> Path:
    """One MoE layer, 2 experts of 1 MiB, top-1: prefill routes to 0, then four decode steps 1, 0, 1, 0."""
    writer = TraceWriter(TraceMeta("hand", "olmoe", 1, [0], 2, 1, MIB, "test"))
    steps = [("prefill", 0), ("decode", 1), ("decode", 0), ("decode", 1), ("decode", 0)]
    for step, (phase, expert) in enumerate(steps):
        writer.add(0, step, step, phase, 0, [expert], [1.0])
    return writer.write(path)


def test_prediction_by_hand(tmp_path):
    replay = build_replay(read_trace(_trace(tmp_path / "t.parquet")))
    model = ReadTimeModel.from_profile(_profile(tmp_path / "p.json"))
    one, two = predict(replay, model, ComputeTime(0.01, "given"), ["lru"], [1, 2])
    # 1 slot: every decode step misses: 1 MiB per token at 100 MB/s = 10.48576 ms, + 10 ms compute.
    assert one.misses_per_token == 1.0 and one.hit_rate_decode == 0.0
    assert one.ssd_s_per_token == pytest.approx(MIB / BW)
    assert one.decode_tokens_per_s == pytest.approx(1 / (0.01 + MIB / BW))
    # 2 slots: only the first decode step misses (expert 1): a quarter of 1 MiB per token.
    assert two.misses_per_token == 0.25
    assert two.decode_tokens_per_s == pytest.approx(1 / (0.01 + 0.25 * MIB / BW))


def test_compute_time_from_a_result():
    resident = {"status": "ok", "metrics": {"decode_tokens_per_s": 20.0, "expert_wait_share_pct": 0.0}}
    assert compute_from_result(resident).s_per_token == pytest.approx(0.05)
    waiting = {"status": "ok", "metrics": {"decode_tokens_per_s": 10.0, "expert_wait_share_pct": 40.0}}
    compute = compute_from_result(waiting, "r.json")
    assert compute.s_per_token == pytest.approx(0.06) and "40.0% expert-read wait" in compute.source


def test_validate_against_runs(tmp_path):
    """Run a (1 slot) waited 10.49 ms of its 20.49 ms per token; run b (2 slots) waited for nothing at 100 tokens/s.
    Both computed 10 ms per token (the median). a is predicted exactly; b is predicted slower than measured
    (the model reads b's quarter miss per token: 2.62 ms), an error of 10 / 12.62 - 1 = -20.8%."""
    profile = _profile(tmp_path / "p.json")
    tps_a = 1 / (0.01 + MIB / BW)
    for name, slots, tps, wait_pct in (("a", 1, tps_a, 100 * tps_a * MIB / BW), ("b", 2, 100.0, 0.0)):
        folder = tmp_path / "results" / name
        folder.mkdir(parents=True)
        _trace(folder / "trace.parquet")
        result = {
            "run_id": name,
            "status": "ok",
            "spec": {"seed": 0},
            "resolved": {"policy": "lru", "strategy": "cache", "scope": "per-layer", "cache_slots": slots},
            "metrics": {"decode_tokens_per_s": tps, "expert_wait_share_pct": wait_pct},
            "hardware_profile": str(profile),
            "files": {"trace": "trace.parquet"},
        }
        write_json_atomic(folder / "result.json", result)
    checks, compute, skipped = validate(tmp_path / "results")
    (per_model,) = compute.values()  # one model in this sweep: one compute time
    assert skipped == [] and per_model.s_per_token == pytest.approx(0.01)
    by = {c.run_id: c for c in checks}
    assert by["a"].error_pct == pytest.approx(0.0, abs=1e-9)
    assert by["b"].error_pct == pytest.approx(100 * (0.01 / (0.01 + 0.25 * MIB / BW) - 1))
    out = CliRunner().invoke(cli_main, ["predict", "--validate", str(tmp_path / "results")])
    assert out.exit_code == 0, out.output
    assert "+0.0%" in out.output and "-20.8%" in out.output


def test_cli_predict_with_a_published_profile(tmp_path):
    trace = _trace(tmp_path / "t.parquet")
    profile = PUBLISHED / "samsung-870-evo-1tb.json"
    args = ["predict", "--trace", str(trace), "--profile", str(profile), "--capacity", "1"]
    out = CliRunner().invoke(cli_main, [*args, "--compute-s-per-token", "0.01"])
    assert out.exit_code == 0, out.output
    # 1 MiB at 560 MB/s (the 870 EVO's published sequential read): 1.87 ms + 10 ms -> 84.2 tokens/s.
    assert f"{1 / (0.01 + MIB / 560e6):.3g}" in out.output
    missing = CliRunner().invoke(cli_main, ["predict", "--trace", str(trace), "--profile", str(profile)])
    assert missing.exit_code == 2 and "compute time" in missing.output


def test_published_profiles_name_a_source_per_figure():
    files = sorted(PUBLISHED.glob("*.json"))
    assert len(files) >= 5
    for path in files:
        doc = read_json(path)
        ReadTimeModel.from_document(doc, str(path))
        assert all(job["source"]["url"].startswith("https://") and job["source"]["figure"] for job in doc["jobs"])
