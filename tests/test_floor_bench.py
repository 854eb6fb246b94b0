"""The floor benchmark: `--reads-only` (the runtime/fio read comparison alone, on a packed model), and where its
cells' floor takes its compute figure from."""

import json
import subprocess
from pathlib import Path

from click.testing import CliRunner

from harness.benchmarks import floor as floor_bench
from harness.benchmarks.floor import main
from harness.runtime.floor import COMPUTE_CACHE_ENV
from harness.spec import RunSpec
from harness.ssd.engine import resolve_backend


def test_reads_only_compares_the_packs_reads_without_a_run(tiny_model, tmp_path):
    model = tiny_model("olmoe")
    args = ["--model", str(model), "--reads-only", "--read-seconds", "0.2", "--io-repeats", "1"]
    out = CliRunner().invoke(main, [*args, "--results", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "expert reads of" in out.output and "medians of 1 rounds at queue depth 4:" in out.output
    assert "  runtime " in out.output
    if resolve_backend() == "io_uring":  # the profiler's ring over the runtime loop's buffers, beside the runtime
        assert "  ring " in out.output and "  runtime/ring " in out.output
    assert not any(tmp_path.iterdir())  # no run


def test_reads_only_refuses_a_model_that_is_not_packed(tmp_path):
    out = CliRunner().invoke(main, ["--model", str(tmp_path / "no-model"), "--reads-only"])
    assert out.exit_code == 2 and "is not packed" in out.output


def test_reads_only_at_the_depths_given(tiny_model, tmp_path):
    args = ["--model", str(tiny_model("olmoe")), "--reads-only", "--read-seconds", "0.2", "--io-repeats", "1"]
    out = CliRunner().invoke(main, [*args, "--io-depths", "1,3", "--results", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "at queue depth 1 (given)" in out.output and "at queue depth 3 (given)" in out.output


def test_a_bad_depth_is_refused_in_one_line(tiny_model):
    out = CliRunner().invoke(main, ["--model", str(tiny_model("olmoe")), "--reads-only", "--io-depths", "1,deep"])
    assert out.exit_code == 2 and "'deep' is neither 'profile' nor a queue depth" in out.output


def fake_result(expert_file: str, compute_s: float) -> dict:
    """The parts of a run's result the benchmark's table reads."""
    metrics = {
        "decode_tokens_per_s": 10.0,
        "decode_floor_ratio": 1.5,
        "decode_floor": {"compute_s_per_token": compute_s, "floor_s_per_token": 0.1},
        "expert_io": {"backend": "threads", "queue_depth": 1},
    }
    return {"metrics": metrics, "validity": {"valid": True}, "resolved": {"expert_file": expert_file}}


def test_the_floors_compute_is_measured_again_each_cell_or_round(tiny_model, tmp_path, monkeypatch):
    """Per round, every cell of a round shares one compute cache folder and each round has its own, so each round
    measures the compute again; per cell (default), every cell has its own; `--compute cached` leaves the harness's
    cache in place."""
    seen: list[tuple[int, str | None]] = []

    def fake_cell(spec, results, compute_cache=None):
        seen.append((spec.repeat, None if compute_cache is None else str(compute_cache)))
        return fake_result(str(tmp_path / "experts.bin"), 0.05 + spec.repeat / 100)

    monkeypatch.setattr(floor_bench, "run_cell", fake_cell)
    monkeypatch.setattr(floor_bench, "read_comparison", lambda *args, **kwargs: None)
    args = ["--model", str(tiny_model("olmoe")), "--shares", "25%", "--strategy", "cache", "--strategy", "prefetch"]
    out = CliRunner().invoke(main, [*args, "--rounds", "2", "--compute", "per-round", "--results", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    folders = {round_: {folder for r, folder in seen if r == round_} for round_ in (0, 1)}
    assert len(seen) == 4 and all(len(f) == 1 for f in folders.values())
    assert folders[0] != folders[1] and None not in folders[0] | folders[1]
    assert "compute 50.0 ms/token" in out.output and "compute 60.0 ms/token" in out.output
    assert not any(Path(f).exists() for f in folders[0] | folders[1])  # this invocation's figures only
    seen.clear()
    out = CliRunner().invoke(main, [*args, "--rounds", "2", "--results", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    cell_folders = [folder for _, folder in seen]
    assert len(set(cell_folders)) == 4 and None not in cell_folders
    assert not set(cell_folders) & (folders[0] | folders[1])  # a fresh temporary folder per invocation
    seen.clear()
    out = CliRunner().invoke(main, [*args, "--rounds", "2", "--compute", "cached", "--results", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    assert [folder for _, folder in seen] == [None] * 4


def test_a_cell_caches_its_compute_where_it_is_told(tmp_path, monkeypatch):
    envs: list[dict | None] = []
    spec = RunSpec(model="m", prompt="p")

    def fake_run(cmd, env=None, **kwargs):
        envs.append(env)
        (tmp_path / spec.run_id).mkdir(exist_ok=True)
        (tmp_path / spec.run_id / "result.json").write_text(json.dumps({"run_id": spec.run_id}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(floor_bench.subprocess, "run", fake_run)
    assert floor_bench.run_cell(spec, tmp_path, tmp_path / "round-3") == {"run_id": spec.run_id}
    assert envs[-1][COMPUTE_CACHE_ENV] == str(tmp_path / "round-3")
    floor_bench.run_cell(spec, tmp_path)
    assert envs[-1] is None  # the harness's own cache


def test_recall_names_the_shadows_precision_beside_od_moes():
    def run(**stats):
        return {"strategy": {"stats": stats}}

    same = run(predictor="shadow-int8", shadow_dense_precision="int8", prediction={"recall": 0.692})
    assert floor_bench.recall_of([same]) == "shadow-int8 0.692 (OD-MoE 0.9734)"
    mixed = run(
        predictor="shadow-int8",
        shadow_dense_precision="fp16",
        prediction={"recall": 0.9},
        gate_prediction={"recall": 0.7},
    )
    assert floor_bench.recall_of([mixed]) == "shadow-int8 (dense fp16) 0.900 (OD-MoE 0.9734), gate 0.700"
    gate = run(predictor="next-layer gate", prediction={"recall": 0.697})
    assert floor_bench.recall_of([gate, gate]) == "gate 0.697"
