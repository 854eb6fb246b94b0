"""Importers of route-simulator JSONL, vLLM routed-expert arrays, per-prompt CSVs and Megatron-Core routing
traces (hand-written samples in tests/fixtures), their one-line errors, and the libCacheSim export checked
against libCacheSim's own LRU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.errors import HarnessError
from harness.trace.export import export_libcachesim, next_access, request_stream
from harness.trace.importers import import_flame, import_trace
from harness.trace.schema import TraceMeta, TraceWriter, read_trace
from harness.trace.simulate import build_replay, run_replay, simulate

FIXTURES = Path(__file__).parent / "fixtures"
FLAME = Path(__file__).with_name("data") / "flame-moe-290m"
"""Two real layers of the FLAME-MoE-290M slice (PROVENANCE.md there)."""


def _import(fmt, paths, tmp_path, **options):
    report = import_trace(fmt, [Path(p) for p in paths], tmp_path / "t.parquet", **options)
    return report, read_trace(tmp_path / "t.parquet")


# ------------------------------------------------------------------------------------------ route-jsonl


def test_route_jsonl_groups_lines_into_tokens_and_steps(tmp_path):
    report, trace = _import("route-jsonl", [FIXTURES / "route_sim.jsonl"], tmp_path)
    assert (report.rows, report.sequences, report.layers) == (4, 2, [0, 1])
    assert "inferred as max id + 1 = 4" in report.notes[0]
    assert (trace.meta.num_experts, trace.meta.top_k, trace.meta.moe_layers) == (4, 2, [0, 1])
    a, b = trace.sequences
    assert a.step.tolist() == [0, 1, 2] and a.pos.tolist() == [0, 1, 2]
    assert a.phase.tolist() == [0, 1, 1]  # prefill, decode, decode (default)
    assert a.experts[:, 0].tolist() == [[1, 2], [2, 0], [1, 3]]
    assert a.experts[:, 1].tolist() == [[0, 3], [3, 1], [0, 1]]
    # b's token shares step 1 with a's second token: one batched forward pass
    assert b.step.tolist() == [1] and b.pos.tolist() == [0] and b.experts[0].tolist() == [[3, 1], [2, 0]]
    assert trace.sequences[0].weights is None  # only some lines carry weights


def test_route_jsonl_files_follow_one_another(tmp_path):
    line = {"t": 5, "layer": 0, "experts": [1]}
    for name in ("x.jsonl", "y.jsonl"):
        (tmp_path / name).write_text(json.dumps(line) + "\n" + json.dumps({**line, "t": 6}) + "\n")
    report, trace = _import("route-jsonl", [tmp_path / "x.jsonl", tmp_path / "y.jsonl"], tmp_path, num_experts=2)
    assert report.notes == [] and trace.meta.num_experts == 2
    assert [s.step.tolist() for s in trace.sequences] == [[0, 1], [2, 3]]


@pytest.mark.parametrize(
    ("text", "options", "message"),
    [
        ('{"t": 0, "layer": 0, "experts": [1]}\nnot json\n', {}, r"x\.jsonl:2: malformed route line"),
        ('{"t": 0, "layer": 0}\n', {}, r"x\.jsonl:1: route line lacks 'experts'"),
        ('{"t": 0, "layer": 0, "experts": [-1]}\n', {}, r"x\.jsonl:1: expert id -1 is outside 0\.\.32767"),
        ('{"t": 0, "layer": 0, "experts": [4]}\n', {"num_experts": 4}, r"x\.jsonl:1: expert id 4 is outside 0\.\.3"),
        ('{"t": 0, "layer": 0, "experts": [40000]}\n', {}, r"x\.jsonl:1: expert id 40000 .*int16"),
        ('{"t": 0, "layer": 0, "experts": [1, 1]}\n', {}, r"x\.jsonl:1: .*repeat"),
        ('{"t": 0, "layer": 0, "experts": [1], "phase": "x"}\n', {}, r"x\.jsonl:1: unknown phase 'x'"),
        ('{"t": 0, "layer": 0, "experts": [1]}\n{"t": 0, "layer": 1, "experts": [1, 2]}\n', {}, r"x\.jsonl:2: 2 ex"),
        (
            '{"t": 0, "layer": 0, "experts": [1]}\n{"t": 1, "layer": 1, "experts": [2]}\n',
            {},
            r"x\.jsonl:1: .*layers \[1\]",
        ),
        ("", {}, r"x\.jsonl: empty file"),
    ],
)
def test_route_jsonl_bad_input_is_one_line_naming_file_and_line(tmp_path, text, options, message):
    (tmp_path / "x.jsonl").write_text(text)
    with pytest.raises(HarnessError, match=message) as caught:
        import_trace("route-jsonl", [tmp_path / "x.jsonl"], tmp_path / "t.parquet", **options)
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------------------------------ vllm-routed


def test_vllm_routed_npy_and_npz_give_one_sequence_per_array(tmp_path):
    first = np.array([[[0, 3], [1, 2]], [[3, 1], [2, 0]], [[0, 1], [1, 3]]], dtype=np.int32)  # [3 tokens, 2, 2]
    second = np.array([[[2, 1], [0, 3]]], dtype=np.int64)
    np.save(tmp_path / "r0.npy", first)
    np.savez(tmp_path / "both.npz", req_a=first, req_b=second)
    report, trace = _import("vllm-routed", [tmp_path / "both.npz"], tmp_path, num_experts=8)
    assert (report.rows, report.sequences, report.layers, report.notes) == (4, 2, [0, 1], [])
    assert (trace.meta.num_experts, trace.meta.top_k) == (8, 2)
    a, b = trace.sequences
    assert np.array_equal(a.experts, first) and np.array_equal(b.experts, second)
    assert a.step.tolist() == [0, 1, 2] and b.step.tolist() == [3] and a.phase.tolist() == [1, 1, 1]
    _, single = _import("vllm-routed", [tmp_path / "r0.npy"], tmp_path)
    assert np.array_equal(single.sequences[0].experts, first) and single.meta.num_experts == 4


@pytest.mark.parametrize(
    ("array", "options", "message"),
    [
        (np.array([[[0, 1]], [[2, -1]]]), {}, r"r\.npy: token 1, MoE layer 0: expert id -1 is outside"),
        (np.array([[[0, 1]], [[2, 9]]]), {"num_experts": 8}, r"token 1, MoE layer 0: expert id 9 is outside 0\.\.7"),
        (np.array([[0, 1]]), {}, r"r\.npy: expected a non-empty \[tokens, moe_layers, top_k\] array"),
        (np.array([[[0.0, 1.0]]]), {}, r"r\.npy: expert ids must be integers"),
        (np.array([[[3, 3]]]), {}, r"token 0, MoE layer 0: expert ids \[3, 3\] repeat"),
    ],
)
def test_vllm_routed_bad_arrays_name_file_and_token(tmp_path, array, options, message):
    np.save(tmp_path / "r.npy", array)
    with pytest.raises(HarnessError, match=message):
        import_trace("vllm-routed", [tmp_path / "r.npy"], tmp_path / "t.parquet", **options)


def test_vllm_routed_empty_or_foreign_file(tmp_path):
    (tmp_path / "e.npy").write_bytes(b"")
    with pytest.raises(HarnessError, match=r"e\.npy: empty file"):
        import_trace("vllm-routed", [tmp_path / "e.npy"], tmp_path / "t.parquet")
    (tmp_path / "j.npy").write_text('{"t": 0}\n')
    with pytest.raises(HarnessError, match=r"j\.npy: not a readable \.npy/\.npz"):
        import_trace("vllm-routed", [tmp_path / "j.npy"], tmp_path / "t.parquet")


# ------------------------------------------------------------------------------------------- prompt-csv


def test_prompt_csv_folder_gives_one_sequence_per_file(tmp_path):
    report, trace = _import("prompt-csv", [FIXTURES / "prompt_csv"], tmp_path)
    assert (report.rows, report.sequences, report.layers) == (6, 2, [0, 1])
    assert (trace.meta.num_experts, trace.meta.top_k) == (8, 2)
    p0, p1 = trace.sequences
    # prompt_000: batch 0 holds two tokens (prefill), batches 1 and 2 one each (decode)
    assert p0.step.tolist() == [0, 0, 1, 2] and p0.pos.tolist() == [0, 1, 2, 3]
    assert p0.phase.tolist() == [0, 0, 1, 1]
    assert p0.experts[:, 0].tolist() == [[1, 5], [5, 3], [1, 5], [4, 1]]
    assert p0.experts[:, 1].tolist() == [[2, 0], [7, 2], [0, 6], [6, 0]]
    # prompt_001: columns in another order, ids space-separated; replayed after prompt_000
    assert p1.step.tolist() == [3, 4] and p1.phase.tolist() == [1, 1]
    assert p1.experts.tolist() == [[[7, 2], [3, 4]], [[2, 7], [4, 5]]]
    files = sorted((FIXTURES / "prompt_csv").glob("*.csv"))
    _, same = _import("prompt-csv", files, tmp_path)
    assert all(np.array_equal(x.experts, y.experts) for x, y in zip(trace.sequences, same.sequences, strict=True))


@pytest.mark.parametrize(
    ("text", "options", "message"),
    [
        ("Layer ID,Batch Number,Token\n0,0,a\n", {}, r"p\.csv:1: missing column\(s\) Activated Expert IDs"),
        (
            'Layer ID,Batch Number,Token,Activated Expert IDs\n0,0,a,"[1, 2]"\n0,1,b,"[1, x]"\n',
            {},
            r"p\.csv:3: .*non-int",
        ),
        ("Layer ID,Batch Number,Token,Activated Expert IDs\n0,0,a,1 2\n", {}, r"p\.csv:2: .*not a bracketed list"),
        (
            'Layer ID,Batch Number,Token,Activated Expert IDs\n0,0,a,"[1, -2]"\n',
            {},
            r"p\.csv:2: expert id -2 is outside",
        ),
        (
            'Layer ID,Batch Number,Token,Activated Expert IDs\n0,0,a,"[1, 8]"\n',
            {"num_experts": 8},
            r"p\.csv:2: .* 8 is",
        ),
        ('Layer ID,Batch Number,Token,Activated Expert IDs\nx,0,a,"[1]"\n', {}, r"p\.csv:2: Layer ID and Batch"),
        ('Layer ID,Batch Number,Token,Activated Expert IDs\n0,0,"[1]"\n', {}, r"p\.csv:2: 3 fields"),
        ("", {}, r"p\.csv: empty file"),
        ("Layer ID,Batch Number,Token,Activated Expert IDs\n", {}, r"p\.csv: no data rows"),
    ],
)
def test_prompt_csv_bad_input_is_one_line_naming_file_and_line(tmp_path, text, options, message):
    (tmp_path / "p.csv").write_text(text)
    with pytest.raises(HarnessError, match=message):
        import_trace("prompt-csv", [tmp_path / "p.csv"], tmp_path / "t.parquet", **options)


def test_prompt_csv_batch_missing_a_layer(tmp_path):
    (tmp_path / "p.csv").write_text(
        'Layer ID,Batch Number,Token,Activated Expert IDs\n0,0,a,"[1]"\n1,0,a,"[2]"\n0,1,b,"[3]"\n'
    )
    with pytest.raises(HarnessError, match=r"p\.csv:4: batch 1 has a different number of tokens per layer"):
        import_trace("prompt-csv", [tmp_path / "p.csv"], tmp_path / "t.parquet")


# --------------------------------------------------------------------------------------- megatron-jsonl


def test_megatron_records_become_forward_passes(tmp_path):
    report, trace = _import("megatron-jsonl", [FIXTURES / "megatron" / "router_trace_rank0.jsonl"], tmp_path)
    assert (report.rows, report.sequences, report.layers) == (5, 1, [0, 1])
    assert any("skipped 1 records" in n for n in report.notes)  # the MTP record
    (seq,) = trace.sequences
    assert seq.step.tolist() == [0, 0, 0, 1, 2] and seq.pos.tolist() == [0, 1, 2, 3, 4]
    assert seq.experts[:, 0].tolist() == [[4, 1], [0, 2], [7, 4], [4, 7], [2, 4]]
    assert seq.experts[:, 1].tolist() == [[3, 5], [5, 6], [1, 0], [5, 3], [6, 3]]
    assert seq.weights is None and (trace.meta.num_experts, trace.meta.top_k) == (8, 2)


def test_megatron_micro_batches_are_separate_passes(tmp_path):
    record = {"step": 0, "layer": 0, "num_tokens": 1, "topk": 1}
    lines = [{**record, "top_indices": [[e]]} for e in (1, 2)] + [{**record, "step": 1, "top_indices": [[3]]}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    _, trace = _import("megatron-jsonl", [tmp_path / "r.jsonl"], tmp_path, num_experts=4)
    assert trace.sequences[0].step.tolist() == [0, 1, 2]
    assert trace.sequences[0].experts[:, 0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    ("lines", "options", "message"),
    [
        (['{"step": 0, "layer": 0, "top_indices": [[1]]}', "{oops"], {}, r"r\.jsonl:2: malformed JSON"),
        (['{"step": 0, "layer": 0}'], {}, r"r\.jsonl:1: record lacks 'top_indices'"),
        (['{"step": 0, "layer": 0, "top_indices": [[1, -3]]}'], {}, r"r\.jsonl:1: expert id -3 is outside"),
        (['{"step": 0, "layer": 0, "top_indices": [[1, 8]]}'], {"num_experts": 8}, r"r\.jsonl:1: expert id 8"),
        (['{"step": 0, "layer": 0, "num_tokens": 2, "top_indices": [[1]]}'], {}, r"r\.jsonl:1: num_tokens 2"),
        (['{"step": -1, "layer": 0, "top_indices": [[1]]}'], {}, r"r\.jsonl:1: 'step' must be a non-negative"),
        (
            ['{"step": 0, "layer": 0, "top_indices": [[1]]}', '{"step": 1, "layer": 1, "top_indices": [[1]]}'],
            {},
            r"r\.jsonl:1: step 0 has no record for layers \[1\]",
        ),
        ([], {}, r"r\.jsonl: empty file"),
    ],
)
def test_megatron_bad_input_is_one_line_naming_file_and_line(tmp_path, lines, options, message):
    (tmp_path / "r.jsonl").write_text("".join(line + "\n" for line in lines))
    with pytest.raises(HarnessError, match=message):
        import_trace("megatron-jsonl", [tmp_path / "r.jsonl"], tmp_path / "t.parquet", **options)


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_import_and_export_and_their_errors(tmp_path):
    runner = CliRunner()
    out = tmp_path / "t.parquet"
    ok = runner.invoke(
        main, ["trace", "import", "--format", "prompt-csv", str(FIXTURES / "prompt_csv"), "--out", str(out)]
    )
    assert ok.exit_code == 0 and "6 token rows, 2 sequences" in " ".join(ok.output.split()), ok.output
    ok = runner.invoke(main, ["trace", "export", str(out), "--format", "oraclegeneral", "--out", str(tmp_path / "o")])
    assert ok.exit_code == 0 and (tmp_path / "o").stat().st_size % 24 == 0, ok.output
    (tmp_path / "bad.jsonl").write_text('{"t": 0, "layer": 0, "experts": [1]}\n{"t": 1\n')
    bad = runner.invoke(
        main, ["trace", "import", "--format", "route-jsonl", str(tmp_path / "bad.jsonl"), "--out", str(out)]
    )
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1 and "bad.jsonl:2" in bad.stderr
    bad = runner.invoke(main, ["trace", "export", str(out), "--format", "oraclegeneral", "--out", "x", "--layer", "7"])
    assert bad.exit_code == 2 and "layer 7 is not a MoE layer" in bad.stderr
    bad = runner.invoke(
        main, ["trace", "import", "--format", "vllm-jsonl", "--num-experts", "4", "x.jsonl", "--out", str(out)]
    )
    assert bad.exit_code == 2 and "does not apply to vllm-jsonl" in bad.stderr


# ------------------------------------------------------------------------------------------ export


def _top1_trace(tmp_path: Path, steps: int = 300, experts: int = 12) -> Path:
    """A skewed top-1 trace over layers 0 and 2, three sequences one after another."""
    rng = np.random.default_rng(7)
    ids = rng.zipf(1.4, size=(steps, 2)) % experts
    writer = TraceWriter(TraceMeta("toy", "toy", 3, [0, 2], experts, 1, 0, "test"))
    for t in range(steps):
        for li, layer in enumerate((0, 2)):
            writer.add(t // 100, t % 100, t, "decode", layer, [int(ids[t, li])], None)
    return writer.write(tmp_path / "top1.parquet")


def _reader(lcs, path: Path, fmt: str):
    if fmt == "oraclegeneral":
        return lcs.TraceReader(str(path), lcs.TraceType.ORACLE_GENERAL_TRACE)
    params = lcs.ReaderInitParam(has_header=True, delimiter=",")
    params.time_field, params.obj_id_field, params.obj_size_field = 1, 2, 3
    return lcs.TraceReader(str(path), lcs.TraceType.CSV_TRACE, params)


@pytest.mark.parametrize("fmt", ["libcachesim-csv", "oraclegeneral"])
def test_libcachesim_lru_on_the_export_gives_the_harness_lru_counts(tmp_path, fmt):
    """One expert per (step, layer): libCacheSim reads the file itself and its LRU must agree exactly,
    in global scope (one file of all layers) and per-layer scope (one file per layer, one cache each)."""
    lcs = pytest.importorskip("libcachesim", reason="libcachesim not installed (pip install libcachesim)")
    trace = read_trace(_top1_trace(tmp_path))
    replay = build_replay(trace)
    export_libcachesim(trace, tmp_path / "all", fmt)  # type: ignore[arg-type]
    for capacity in (2, 5, 9):
        harness = run_replay(replay, "lru", capacity, "global").total()
        ratio, _ = lcs.LRU(cache_size=capacity).process_trace(_reader(lcs, tmp_path / "all", fmt))
        assert round(ratio * harness.accesses) == harness.misses, capacity
    for layer in (0, 2):
        export_libcachesim(trace, tmp_path / f"L{layer}", fmt, layer=layer)  # type: ignore[arg-type]
        for capacity in (2, 5):
            harness = run_replay(replay, "lru", capacity, "per-layer").total(layer=layer)
            ratio, _ = lcs.LRU(cache_size=capacity).process_trace(_reader(lcs, tmp_path / f"L{layer}", fmt))
            assert round(ratio * harness.accesses) == harness.misses, (layer, capacity)


def test_oraclegeneral_records_and_libcachesim_belady(tmp_path):
    lcs = pytest.importorskip("libcachesim", reason="libcachesim not installed (pip install libcachesim)")
    trace = read_trace(_top1_trace(tmp_path))
    export_libcachesim(trace, tmp_path / "o", "oraclegeneral")
    from harness.trace.export import ORACLE_GENERAL

    records = np.fromfile(tmp_path / "o", dtype=ORACLE_GENERAL)
    times, ids = request_stream(trace)
    assert ORACLE_GENERAL.itemsize == 24 and len(records) == 600
    assert np.array_equal(records["time"], times) and np.array_equal(records["obj_id"], ids)
    assert records["time"][:4].tolist() == [0, 0, 1, 1]  # layers 0 and 2 of each step
    assert records["obj_id"][1] // 12 == 2  # obj id = layer * num_experts + expert
    assert next_access(np.array([5, 7, 5, 5, 7, 9])).tolist() == [2, 4, 3, -1, -1, -1]
    # libCacheSim's Belady reads next_access_vtime: with one request at a time it is the textbook
    # optimum, which a direct furthest-next-use replay gives too.
    for capacity in (3, 6):
        cache: dict[int, int] = {}
        misses = 0
        for i, (obj, nxt) in enumerate(zip(ids.tolist(), next_access(ids).tolist(), strict=True)):
            if obj not in cache:
                misses += 1
                if len(cache) == capacity:
                    del cache[max(cache, key=cache.__getitem__)]
            cache[obj] = nxt if nxt >= 0 else len(ids) + i
        ratio, _ = lcs.Belady(cache_size=capacity).process_trace(_reader(lcs, tmp_path / "o", "oraclegeneral"))
        assert round(ratio * len(ids)) == misses


@pytest.mark.parametrize("capacity", [8, 16])
def test_flame_export_replayed_by_libcachesim_lru_step_by_step(tmp_path, capacity):
    """Top-6 routing: the csv's time column gives the steps back, and libCacheSim's LRU, served each step's
    resident experts first (the harness never evicts what a step needs), matches the harness per layer."""
    lcs = pytest.importorskip("libcachesim", reason="libcachesim not installed (pip install libcachesim)")
    import_flame(sorted(FLAME.glob("*.pt")), tmp_path / "f.parquet", sequence_length=512)
    trace = read_trace(tmp_path / "f.parquet")
    result = simulate(trace, "lru", capacity)
    layer = trace.meta.moe_layers[1]
    export_libcachesim(trace, tmp_path / "f.csv", "libcachesim-csv", layer=layer)
    rows = np.loadtxt(tmp_path / "f.csv", delimiter=",", skiprows=1, dtype=np.int64)
    assert len(rows) == result.total(layer=layer).accesses
    cache = lcs.LRU(cache_size=capacity)
    hits = 0
    for step in np.split(rows[:, 1], np.flatnonzero(np.diff(rows[:, 0])) + 1):
        requests = [_request(lcs, int(obj)) for obj in step]
        present = [r for r in requests if cache.find(r, update_cache=False) is not None]
        for req in present + [r for r in requests if r not in present]:
            hits += bool(cache.get(req))
    assert hits == result.total(layer=layer).hits


def _request(lcs, obj_id: int):
    req = lcs.Request()
    req.obj_id, req.obj_size = obj_id, 1
    return req
