"""`harness model create | pack` for architectures and expert formats: quantized packs, refusals in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from harness.models.archs import REFUSED, SUPPORTED
from harness.models.quant import FORMATS, dequantize, quantize, round_trip
from harness.store.layout import PackIndex
from tests.test_cli_errors import assert_one_line_error, run_cli


def test_pack_with_expert_dtype_reports_bits_per_weight(tiny_model, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model("mixtral"), model_dir)
    result = run_cli("model", "pack", str(model_dir), "--expert-dtype", "int8")
    assert result[0] == 0, result
    index = PackIndex.load(model_dir / "packed" / "index.json")
    assert (index.expert_dtype, index.group_size, index.bits_per_weight) == ("int8", 32, 8.5)
    # gate_up_proj [2I, H] and down_proj [H, I] of the tiny preset (H 64, I 32): one byte per weight, two per scale.
    assert index.expert_bytes == (64 * 64 + 64 * 32) * (1 + 2 / 32)
    assert_one_line_error(
        *run_cli("model", "pack", str(model_dir), "--expert-dtype", "int4", "--group-size", "48"), "group size 48"
    )


def test_refused_and_prequantized_checkpoints_get_one_line(tiny_model, tmp_path):
    llama4 = tmp_path / "llama4"
    llama4.mkdir()
    (llama4 / "config.json").write_text(json.dumps({"model_type": "llama4_text"}))
    assert_one_line_error(*run_cli("model", "pack", str(llama4)), "takes no top-k expert index")
    quantized = tmp_path / "fp8"
    shutil.copytree(tiny_model("gpt_oss"), quantized, ignore=shutil.ignore_patterns("packed"))
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8"}
    (quantized / "config.json").write_text(json.dumps(config))
    assert_one_line_error(*run_cli("model", "pack", str(quantized)), "pre-quantized weights (quantization_config: fp8)")
    config["quantization_config"] = {"quant_method": "mxfp4"}  # but its experts are not stored as MXFP4
    (quantized / "config.json").write_text(json.dumps(config))
    assert_one_line_error(*run_cli("model", "pack", str(quantized)), "no MXFP4 expert blocks (*_blocks, *_scales)")


def test_quantization_is_groupwise_symmetric_and_exact_on_representable_values():
    # Each group of 4 holds multiples of its own step, with its largest magnitude at qmax: the round trip is exact.
    for fmt in (FORMATS["int8"], FORMATS["int4"]):
        step = torch.tensor([[0.5], [0.25]]).repeat_interleave(4, dim=0).reshape(2, 4)
        values = torch.tensor([[fmt.qmax, -1, 0, 3], [-fmt.qmax, 2, -2, 1]], dtype=torch.float32)
        weight = (values * step).reshape(1, 8)
        stored, scale = quantize(weight, fmt, 4)
        assert scale.tolist() == [[0.5, 0.25]]
        assert stored.dtype == fmt.storage and stored.shape == (1, 8 if fmt.bits == 8 else 4)
        assert torch.equal(dequantize(stored, scale, fmt, torch.float32), weight)
    int4 = FORMATS["int4"]
    stored, _ = quantize(torch.tensor([[7.0, -7.0, 1.0, -1.0]]), int4, 4)
    assert stored.tolist() == [[0x97, 0xF1]]  # low nibble first; -7 = 0x9, -1 = 0xF
    zeros = torch.zeros(2, 8, dtype=torch.bfloat16)
    assert torch.equal(round_trip(zeros, int4, 4), zeros)


def test_readme_lists_every_supported_and_refused_architecture():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    missing = [arch for arch in (*SUPPORTED, *REFUSED) if f"`{arch}`" not in readme]
    assert not missing, f"README.md does not list {missing}"
