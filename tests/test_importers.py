"""Importers: FLAME-MoE-Traces (.pt and .csv) and vLLM MoE-logger JSONL, on real and hand-written files."""

import json
from pathlib import Path

import numpy as np
import pytest

from harness.errors import HarnessError
from harness.trace.importers import import_flame, import_trace, import_vllm_jsonl
from harness.trace.schema import read_trace

FIXTURES = Path(__file__).parent / "fixtures"
FLAME = Path(__file__).with_name("data") / "flame-moe-290m"
"""Layers 2 and 3 of the FLAME-MoE-290M slice as .pt, layer 2's first 128 tokens as .csv (PROVENANCE.md)."""


def test_vllm_single_file_drops_warmup_and_rebuilds_steps(tmp_path):
    report = import_vllm_jsonl([FIXTURES / "vllm_all_layers.jsonl"], tmp_path / "t.parquet")
    assert report.dropped_warmup_rows == 6  # 3 rows x 2 layers of uniform weights on experts {0, 1}
    assert (report.rows, report.sequences, report.layers) == (5, 2, [0, 1])
    trace = read_trace(tmp_path / "t.parquet")
    assert (trace.meta.num_experts, trace.meta.top_k, trace.meta.model) == (4, 2, "toy/moe")
    r1, r2 = trace.sequences
    # token_idx 0,1 | 0 | 0,1: three forward passes; the first (two rows of r1) is a prefill.
    assert r1.step.tolist() == [0, 0, 1, 2] and r1.pos.tolist() == [0, 1, 2, 3]
    assert r1.phase.tolist() == [0, 0, 1, 1]  # prefill, prefill, decode, decode
    assert r2.step.tolist() == [2] and r2.pos.tolist() == [0]
    assert r1.experts[:, 0].tolist() == [[1, 2], [2, 3], [2, 0], [1, 2]]
    assert r1.experts[:, 1].tolist() == [[0, 3], [1, 3], [3, 1], [0, 1]]
    assert r2.experts[0].tolist() == [[3, 0], [2, 1]]
    assert np.allclose(r1.weights[0, 0], [0.6, 0.4])


def test_vllm_one_file_per_layer_gives_the_same_trace(tmp_path):
    import_vllm_jsonl([FIXTURES / "vllm_all_layers.jsonl"], tmp_path / "a.parquet")
    report = import_trace(
        "vllm-jsonl", [FIXTURES / "vllm_layer1.jsonl", FIXTURES / "vllm_layer0.jsonl"], tmp_path / "b.parquet"
    )
    assert report.dropped_warmup_rows == 6
    a, b = read_trace(tmp_path / "a.parquet"), read_trace(tmp_path / "b.parquet")
    for x, y in zip(a.sequences, b.sequences, strict=True):
        assert np.array_equal(x.experts, y.experts) and np.array_equal(x.step, y.step)


def test_vllm_running_counter_gives_one_step_per_row(tmp_path):
    path = tmp_path / "run.jsonl"
    lines = [{"type": "meta", "model_id": "m", "top_k": 1}]
    lines += [{"type": "route", "req_id": "x", "token_idx": 5 + i, "layer": 3, "topk_ids": [i % 2]} for i in range(4)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    report = import_vllm_jsonl([path], tmp_path / "t.parquet")
    assert report.dropped_warmup_rows == 0 and "running counter" in report.notes[0]
    (seq,) = read_trace(tmp_path / "t.parquet").sequences
    assert seq.step.tolist() == [0, 1, 2, 3] and seq.experts[:, 0, 0].tolist() == [0, 1, 0, 1]
    assert read_trace(tmp_path / "t.parquet").meta.num_experts == 2  # no num_experts in meta: max id + 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"type": "route", "req_id": "a", "token_idx": 0, "layer": 0, "topk_ids": [1]}\n', "no meta line"),
        ('{"type": "meta", "top_k": 1}\n{"type": "route", "req_id": "a"}\n', r"t\.jsonl:2: malformed"),
        ('{"type": "meta", "top_k": 1}\nnot json\n', r"t\.jsonl:2: malformed"),
        ('{"type": "meta", "top_k": 1}\n{"type": "bogus"}\n', "unknown line type"),
    ],
)
def test_vllm_bad_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "t.jsonl"
    path.write_text(text)
    with pytest.raises(HarnessError, match=message):
        import_vllm_jsonl([path], tmp_path / "t.parquet")


def test_unknown_format_is_a_clear_error(tmp_path):
    with pytest.raises(HarnessError, match="unknown trace format 'x'"):
        import_trace("x", [FIXTURES / "vllm_all_layers.jsonl"], tmp_path / "t.parquet")


def test_flame_pt_and_csv_give_the_same_routing(tmp_path):
    pt = import_flame(sorted(FLAME.glob("*.pt")), tmp_path / "pt.parquet", sequence_length=512)
    csv = import_flame([FLAME / "encoder_layer02.csv"], tmp_path / "csv.parquet", num_experts=64)
    assert (pt.rows, pt.sequences, pt.layers) == (2048, 4, [2, 3])
    assert (csv.rows, csv.sequences, csv.layers) == (128, 1, [2])
    a, b = read_trace(tmp_path / "pt.parquet"), read_trace(tmp_path / "csv.parquet")
    assert (a.meta.num_experts, a.meta.top_k, a.meta.model) == (64, 6, "flame-moe-290m")
    seq = a.sequences[1]
    assert seq.step[0] == 512 and seq.pos[0] == 0 and seq.experts.shape == (512, 2, 6)
    # The CSV rounds probabilities to 6 decimals, which reorders a few near-ties: compare as sets.
    from_pt = a.sequences[0].experts[:128, 0]
    assert np.array_equal(np.sort(from_pt, axis=-1), np.sort(b.sequences[0].experts[:, 0], axis=-1))
    assert a.sequences[0].experts[0, 0].tolist() == [34, 28, 21, 47, 3, 12]  # first row of encoder_layer02.pt


def test_flame_duplicate_layer_is_refused(tmp_path):
    with pytest.raises(HarnessError, match="layer 2 given twice"):
        import_flame([FLAME / "encoder_layer02.pt", FLAME / "encoder_layer02.csv"], tmp_path / "t.parquet")
