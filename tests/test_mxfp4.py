"""gpt-oss MXFP4 checkpoints: packed in their own format (E2M1 codes in blocks of 32, one E8M0 scale per block)
and dequantized in the offloaded forward; greedy tokens equal those of the resident model that transformers'
own loader dequantizes from the same checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from harness.models.loader import reference_model
from harness.models.packer import pack_model, pack_paths
from harness.models.quant import FORMATS, MXFP4, dequantize, dequantize_mxfp4
from harness.runtime.expert_cache import slot_views
from harness.store.layout import SCALE_SUFFIX, PackIndex
from tests.test_cli_errors import assert_one_line_error, run_cli
from tests.test_offload_equivalence import assert_matches_resident


def mxfp4_checkpoint(source: Path, out: Path) -> Path:
    """A gpt-oss checkpoint as OpenAI ships it: experts as `*_blocks` uint8 [E, out, in/32, 16] and `*_scales`
    uint8 [E, out, in/32] (random codes, scales 2^-9 .. 2^-4), everything else bf16, quant_method mxfp4."""
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("packed"))
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for key, value in load_file(str(source / "model.safetensors")).items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, rows_in, rows_out = value.shape  # in memory [E, in, out]
            shape = (experts, rows_out, rows_in // 32)
            tensors[key + "_blocks"] = torch.randint(0, 256, (*shape, 16), generator=generator, dtype=torch.uint8)
            tensors[key + "_scales"] = torch.randint(118, 124, shape, generator=generator, dtype=torch.uint8)
        else:
            tensors[key] = value.to(torch.bfloat16)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_mxfp4_codes_and_scales_decode_as_the_spec_defines():
    # Two rows of one block: codes 0x1 (0.5) and 0x2 (1.0) in byte 0x21, 0x7 (6) and 0xF (-6) in 0xF7, the
    # rest 0x8 (-0); scales 2^(128 - 127) = 2 and 2^(125 - 127) = 1/4. Result transposed to [in, out].
    blocks = torch.full((2, 1, 16), 0x88, dtype=torch.uint8)
    blocks[0, 0, 0], blocks[1, 0, 15] = 0x21, 0xF7
    scales = torch.tensor([[128], [125]], dtype=torch.uint8)
    weight = dequantize_mxfp4(blocks, scales, torch.float32)
    assert weight.shape == (32, 2)
    assert weight[:2, 0].tolist() == [1.0, 2.0] and weight[30:, 1].tolist() == [1.5, -1.5]
    assert weight[2:, 0].abs().sum() == 0 and torch.signbit(weight[5, 0])
    assert FORMATS["mxfp4"] is MXFP4


def test_mxfp4_checkpoint_packs_in_its_own_format_and_matches_resident_model(tiny_model, tmp_path):
    model_dir = mxfp4_checkpoint(tiny_model("gpt_oss"), tmp_path / "gpt-oss-mxfp4")
    index, wrote = pack_model(model_dir)
    assert wrote and (index.expert_dtype, index.group_size, index.dtype) == ("mxfp4", 32, "bfloat16")
    # Tiny preset: gate_up [64 x 64] and down [64 x 32] weights at half a byte plus a byte per 32, bf16 biases.
    weights, biases = 64 * 64 + 32 * 64, 64 + 64
    assert index.expert_bytes == weights // 2 + weights // 32 + 2 * biases
    assert index.bits_per_weight == round(8 * index.expert_bytes / (weights + biases), 4)
    # The pack's weights dequantize to exactly the weights transformers' loader makes of the checkpoint.
    resident = reference_model(model_dir, index)
    blob = slot_views(memoryview(bytearray(pack_paths(model_dir)["experts"].read_bytes())), index, 1)[0]
    experts = resident.model.layers[0].mlp.experts
    for name in ("gate_up_proj", "down_proj"):
        ours = dequantize(blob[name], blob[name + SCALE_SUFFIX], MXFP4, torch.bfloat16)
        assert torch.equal(ours, getattr(experts, name)[0])
    assert_matches_resident(model_dir, "gpt_oss mxfp4")
    assert_one_line_error(
        *run_cli("model", "pack", str(model_dir), "--force", "--expert-dtype", "int4"),
        "holds MXFP4 experts: they are packed in their own format",
    )
    assert PackIndex.load(pack_paths(model_dir)["index"]).expert_dtype == "mxfp4"
