"""The bad inputs of issue 11, each a one-line error with exit status 2 (no traceback), checked before any work."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner

from harness.cli import main
from harness.errors import ExitCode
from harness.results import read_json
from harness.sweep import CELL_RECORD_FILE
from tests.test_cli_errors import assert_one_line_error
from tests.test_learned import write_random_trace

FIXTURES = Path(__file__).with_name("fixtures")
# A folder nothing can be created in, even by root (tests run as root in some containers).
UNWRITABLE = Path("/proc/harness-test-no-such-folder")


def run_cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stderr.strip()


@pytest.fixture
def trace(tmp_path) -> Path:
    return write_random_trace(tmp_path / "t.parquet")


def _no_work(*_: object, **__: object) -> None:
    raise AssertionError("the work started before the output path was checked")


# --------------------------------------------------------------------------------------- output paths


def test_unwritable_out_is_refused_before_the_work(trace, tmp_path, monkeypatch):
    import harness.ssd.profiler
    import harness.trace.importers
    import harness.trace.simulate
    import harness.trace.train

    monkeypatch.setattr(harness.trace.simulate, "run_simulation", _no_work)
    monkeypatch.setattr(harness.trace.importers, "import_trace", _no_work)
    monkeypatch.setattr(harness.trace.train, "train_flashmoe", _no_work)
    monkeypatch.setattr(harness.ssd.profiler, "create_test_file", _no_work)
    jsonl = FIXTURES / "vllm_all_layers.jsonl"
    target = UNWRITABLE / "x"
    cases = [
        ("simulate", "--trace", trace, "--out", target),
        ("trace", "import", "--format", "vllm-jsonl", jsonl, "--out", target / "t.parquet"),
        ("policy", "train", "--trace", trace, "--out", target / "m.pt"),
        ("profile-ssd", "--path", tmp_path, "--size", "1MiB", "--out", target / "p.json"),
        ("model", "create", "--preset", "tiny", "--out", target),
    ]
    for args in cases:
        assert_one_line_error(*run_cli(*args), "cannot be written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]


def test_output_path_of_the_wrong_kind(trace, tmp_path):
    jsonl = FIXTURES / "vllm_all_layers.jsonl"
    folder = tmp_path / "folder"
    folder.mkdir()
    assert_one_line_error(*run_cli("trace", "import", "--format", "vllm-jsonl", jsonl, "--out", folder), "is a folder")
    assert_one_line_error(*run_cli("policy", "train", "--trace", trace, "--out", folder), "is a folder")
    assert_one_line_error(*run_cli("simulate", "--trace", trace, "--out", trace), "is a file")
    # A folder below an existing file.
    assert_one_line_error(*run_cli("simulate", "--trace", trace, "--out", trace / "sub"), "is not a folder")


def test_read_only_location_is_one_line(tiny_model, tmp_path, monkeypatch):
    import harness.models.packer

    def read_only(*_: object, **__: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "m" / "packed" / "experts.bin"))

    monkeypatch.setattr(harness.models.packer, "pack_model", read_only)
    assert_one_line_error(*run_cli("model", "pack", tiny_model("olmoe")), "Permission denied (a read-only")


# -------------------------------------------------------------------------------------------- traces


def test_parquet_given_to_the_jsonl_importer(trace, tmp_path):
    assert_one_line_error(
        *run_cli("trace", "import", "--format", "vllm-jsonl", trace, "--out", tmp_path / "x.parquet"), "UTF-8 text"
    )


def _vllm(tmp_path: Path, experts: list[int], meta: dict | None = None) -> Path:
    lines = [{"type": "meta", "model_id": "m", "top_k": 2, "num_experts": 8, **(meta or {})}]
    lines += [
        {"type": "route", "req_id": "r", "token_idx": i, "layer": 0, "topk_ids": ids, "topk_weights": [0.6, 0.4]}
        for i, ids in enumerate([experts, [1, 2]])
    ]
    path = tmp_path / "v.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    return path


@pytest.mark.parametrize(
    ("experts", "meta", "needle"),
    [
        ([-1, 2], None, "expert id -1 is outside 0..7"),
        ([40000, 2], {"num_experts": None}, "must be between 1 and 32768 (got 40001)"),
        ([1, 2], {"num_experts": 70000}, "must be between 1 and 32768 (got 70000)"),
        ([9, 2], None, "expert id 9 is outside 0..7"),
        ([1, 2], {"num_experts": "x"}, "num_experts must be a positive integer"),
        ([1, 2], {"top_k": -2}, "top_k must be a positive integer"),
    ],
)
def test_bad_expert_ids_in_vllm_files(tmp_path, experts, meta, needle):
    path = _vllm(tmp_path, experts, meta)
    out = tmp_path / "t.parquet"
    assert_one_line_error(*run_cli("trace", "import", "--format", "vllm-jsonl", path, "--out", out), needle)
    assert not out.exists()


def test_negative_expert_ids_in_flame_files(tmp_path):
    indices = torch.tensor([[0, 1], [2, -3]])
    torch.save({"layer": 2, "indices": indices, "scores": torch.ones(2, 2)}, tmp_path / "encoder_layer02.pt")
    out = tmp_path / "t.parquet"
    args = ("trace", "import", "--format", "flame", tmp_path / "encoder_layer02.pt", "--out", out)
    assert_one_line_error(*run_cli(*args), "expert id -3 is outside")


def _rewrite(trace: Path, out: Path, metadata: dict[bytes, bytes] | None = None, phase: str | None = None) -> Path:
    table = pq.read_table(trace)
    if phase is not None:
        column = pa.array([phase] * len(table)).dictionary_encode().cast(pa.dictionary(pa.int8(), pa.string()))
        table = table.set_column(table.schema.get_field_index("phase"), "phase", column)
    table = table.replace_schema_metadata({**table.schema.metadata, **(metadata or {})})
    pq.write_table(table, out)
    return out


@pytest.mark.parametrize(
    ("metadata", "phase", "needle"),
    [
        (None, "warmup", "unknown phase warmup"),
        ({b"num_experts": b"{not json"}, None, "trace metadata 'num_experts' is not JSON"),
        ({b"moe_layers": b'"0,1"'}, None, "moe_layers of the wrong type"),
        ({b"top_k": b"9"}, None, "1 <= top_k (9) <= num_experts (8)"),
    ],
)
def test_bad_trace_files(trace, tmp_path, metadata, phase, needle):
    bad = _rewrite(trace, tmp_path / "bad.parquet", metadata, phase)
    assert_one_line_error(*run_cli("trace", "info", bad), needle)
    assert_one_line_error(*run_cli("simulate", "--trace", bad), needle)


# ------------------------------------------------------------------------------------ learned policy


def _model_file(tmp_path: Path, layers: object, num_experts: object = 8) -> Path:
    path = tmp_path / "m.pt"
    blob = {"format": "harness-flashmoe", "version": 1, "meta": {"num_experts": num_experts}, "layers": layers}
    torch.save(blob, path)
    return path


def _net(experts: int = 8, hidden: int = 4) -> dict[str, torch.Tensor]:
    shapes = {"w1": (hidden, 2 * experts), "b1": (hidden,), "w2": (hidden, hidden), "b2": (hidden,)}
    shapes |= {"w3": (experts, hidden), "b3": (experts,)}
    return {name: torch.zeros(shape) for name, shape in shapes.items()}


@pytest.mark.parametrize(
    ("layers", "num_experts", "needle"),
    [
        ({}, 8, "holds no layers"),
        (None, 8, "holds no layers"),
        ({0: _net()}, None, "without a valid meta.num_experts"),
        ({0: {"w1": torch.zeros(2, 2)}}, 8, "layer 0: parameters w1, b1, w2, b2, w3, b3 expected"),
        ({0: _net(experts=4)}, 8, "layer 0: w1 has shape [4, 8], expected [4, 16]"),
        ({0: {**_net(), "b3": torch.full((8,), float("nan"))}}, 8, "layer 0: b3 holds NaN"),
        ({"x": _net()}, 8, "layer key 'x' is not a layer number"),
    ],
)
def test_bad_learned_policy_files(trace, tmp_path, layers, num_experts, needle):
    model = _model_file(tmp_path, layers, num_experts)
    assert_one_line_error(*run_cli("simulate", "--trace", trace, "--policy", f"flashmoe:{model}"), needle)


# ---------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ("[1, 2]", "holds a JSON list, not an object"),
        ('{"model_type": "olmoe", "hidden_size": "x"}', "cannot be read by transformers"),
    ],
)
def test_bad_config_json(tiny_model, tmp_path, config, needle):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model("olmoe"), broken)
    shutil.rmtree(broken / "packed")
    (broken / "config.json").write_text(config)
    assert_one_line_error(*run_cli("model", "pack", broken), needle)
    assert_one_line_error(*run_cli("run", "--model", broken, "--results", tmp_path / "r"), needle)
    expert = ("profile-ssd", "--path", tmp_path, "--model", broken, "--size", "1MiB")
    code, err = run_cli(*expert)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err


# ----------------------------------------------------------------------------------------------- run


def test_empty_prompt_is_refused(tiny_model, tmp_path):
    args = ("run", "--model", tiny_model("olmoe"), "--prompt", "", "--decode", "greedy", "--results", tmp_path)
    assert_one_line_error(*run_cli(*args), "the prompt is empty")


def test_prompt_longer_than_the_positions_is_refused(tiny_model, tmp_path):
    model = tiny_model("olmoe")
    positions = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    prompt = " ".join(["word"] * positions)
    args = ("run", "--model", model, "--prompt", prompt, "--decode", "greedy", "--max-new-tokens", "4")
    code, err = run_cli(*args, "--results", tmp_path / "r")
    assert_one_line_error(code, err, f"model's {positions} positions (max_position_embeddings): shorten it")
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("result.json"))


# ------------------------------------------------------------------------------------ sweep and SSD


def test_cell_command_that_cannot_start_fails_each_cell_and_the_sweep_goes_on(tmp_path):
    spec = tmp_path / "s.yaml"
    matrix = {"base": {"model": "m"}, "matrix": {"policy": ["lru", "lfu"]}, "drop_caches": False}
    spec.write_text(yaml.safe_dump(matrix))
    results = tmp_path / "results"
    command = f"{tmp_path / 'no-such-program'} {{spec}}"
    out = CliRunner().invoke(main, ["sweep", str(spec), "--results", str(results), "--cell-command", command])
    assert out.exit_code == ExitCode.FAILED and isinstance(out.exception, SystemExit), out.output
    records = [read_json(p) for p in sorted(results.glob(f"*/{CELL_RECORD_FILE}"))]
    assert len(records) == 2 and all(r["status"] == "failed" and "cannot start" in r["reason"] for r in records)


def test_profile_of_memory_is_refused(tmp_path):
    from harness.ssd.devices import describe_path

    shm = Path("/dev/shm")
    if not shm.is_dir() or describe_path(shm).get("filesystem") != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    code, err = run_cli("profile-ssd", "--path", shm, "--size", "1MiB", "--out", tmp_path / "p.json")
    assert_one_line_error(code, err, "is on tmpfs, which is memory")
    assert not (tmp_path / "p.json").exists()


def test_negative_and_huge_sizes_are_refused(trace, tmp_path):
    assert_one_line_error(*run_cli("simulate", "--trace", trace, "--expert-bytes", "-3MiB"), "negative")
    assert_one_line_error(*run_cli("simulate", "--trace", trace, "--expert-bytes", "1e30"), "beyond 1 EiB")
    assert_one_line_error(*run_cli("simulate", "--trace", trace, "--capacity", "nan%"), "cannot read capacity")


# ------------------------------------------------------------------------------- found by trying more


def test_more_bad_inputs_found_by_trying(tiny_model, trace, tmp_path):
    binary = trace  # a Parquet file where text is expected
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    cases = [
        (("run", "--model", tiny_model("olmoe"), "--workload", binary, "--results", tmp_path), "not a JSONL prompt"),
        (("run", "--model", "m", "--spec", listed, "--results", tmp_path), "must be a JSON object"),
        (("run", "--model", tiny_model("olmoe"), "--results", binary), "is not a folder"),
        (("sweep", binary), "is not UTF-8 text"),
        (("policy", "train", "--trace", trace, "--out", tmp_path / "m.pt", "--max-epochs", "0"), "--max-epochs"),
        (("policy", "train", "--trace", trace, "--out", tmp_path / "m.pt", "--heldout-fraction", "1"), "0<x<1"),
        (("trace", "import", "--format", "flame", binary, "--sequence-length", "0", "--out", tmp_path / "o"), "x>=1"),
    ]
    for args, needle in cases:
        code, err = run_cli(*args)
        assert code == 2 and "Traceback" not in err and needle in err, (args, err)
    assert not (tmp_path / "m.pt").exists()
