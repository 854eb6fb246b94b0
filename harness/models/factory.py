"""Random-init checkpoints of real transformers MoE architectures, saved with `save_pretrained`.

Routing realism (ROUTING.md): at default init, attention averages the whole prefix, so the router
input barely changes between steps and every cache policy looks perfect. The fix keeps a standard
checkpoint: sharpen attention by setting q_norm/k_norm gains to 3.0 (architectures with q/k norms),
or by scaling q_proj and k_proj by 3 / (0.02 * sqrt(hidden)) (architectures without).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from harness.errors import HarnessError
from harness.models.adapters import ADAPTERS, ArchAdapter, adapter_for_model_type
from harness.models.tokenizer import build_tokenizer

log = logging.getLogger(__name__)

ATTENTION_GAIN = 3.0
"""q/k norm gain that makes a random-init model route like a trained one (ROUTING.md: >= 2.5 works)."""
INIT_STD = 0.02
"""transformers' default initializer_range, which the q/k scaling rule of ROUTING.md assumes."""
HARNESS_MARKER = "harness_random_init"
"""Key written into config.json of factory models, so results can say they come from a random init."""


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    experts: int
    top_k: int
    expert_intermediate: int
    vocab: int
    dtype: torch.dtype
    max_positions: int = 4096


PRESETS: dict[str, Preset] = {
    # A few MB: for tests. 8 experts, top-2, 2 layers; full multi-head attention, as OLMoE has (llama.cpp
    # assumes it for OLMoE).
    "tiny": Preset(
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=4,
        experts=8,
        top_k=2,
        expert_intermediate=32,
        vocab=1024,
        dtype=torch.float32,
        max_positions=1024,
    ),
    # The embedded default of `make bench`: OLMoE / Qwen3-30B-A3B shape scaled down. 12 layers x 64
    # experts of 3 MiB (bf16: 3 * 1024 * 512 * 2 bytes) = 2.25 GiB of experts, top-8.
    "small": Preset(
        hidden=1024,
        layers=12,
        heads=16,
        kv_heads=16,
        experts=64,
        top_k=8,
        expert_intermediate=512,
        vocab=8192,
        dtype=torch.bfloat16,
    ),
}


def _config(adapter: ArchAdapter, preset: Preset, seed: int) -> object:
    common = dict(
        vocab_size=preset.vocab,
        hidden_size=preset.hidden,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads,
        num_experts_per_tok=preset.top_k,
        max_position_embeddings=preset.max_positions,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=1,
    )
    per_arch: dict[str, dict] = {
        "mixtral": dict(num_local_experts=preset.experts, intermediate_size=preset.expert_intermediate),
        "qwen2_moe": dict(
            num_experts=preset.experts,
            moe_intermediate_size=preset.expert_intermediate,
            intermediate_size=4 * preset.expert_intermediate,
            shared_expert_intermediate_size=2 * preset.expert_intermediate,
            norm_topk_prob=False,
        ),
        "qwen3_moe": dict(
            num_experts=preset.experts,
            moe_intermediate_size=preset.expert_intermediate,
            intermediate_size=4 * preset.expert_intermediate,
            norm_topk_prob=True,
            head_dim=preset.hidden // preset.heads,
        ),
        "olmoe": dict(num_experts=preset.experts, intermediate_size=preset.expert_intermediate),
        "deepseek_v2": dict(
            n_routed_experts=preset.experts,
            moe_intermediate_size=preset.expert_intermediate,
            intermediate_size=4 * preset.expert_intermediate,
            n_shared_experts=1,
            first_k_dense_replace=0,
            kv_lora_rank=preset.hidden // 4,
            q_lora_rank=None,
            qk_rope_head_dim=preset.hidden // preset.heads // 2,
            qk_nope_head_dim=preset.hidden // preset.heads // 2,
            v_head_dim=preset.hidden // preset.heads,
            n_group=1,
            topk_group=1,
            topk_method="greedy",
        ),
    }
    config = AutoConfig.for_model(adapter.model_types[0], **common, **per_arch[adapter.name])
    setattr(config, HARNESS_MARKER, {"seed": seed, "attention_gain": ATTENTION_GAIN})
    return config


@torch.no_grad()
def _sharpen_attention(model: torch.nn.Module, adapter: ArchAdapter, hidden: int) -> int:
    """Apply the ROUTING.md fix; returns how many tensors were changed (0 means the rule did not apply)."""
    changed = 0
    scale = ATTENTION_GAIN / (INIT_STD * math.sqrt(hidden))
    for name, param in model.named_parameters():
        if adapter.has_qk_norm and (name.endswith("q_norm.weight") or name.endswith("k_norm.weight")):
            param.fill_(ATTENTION_GAIN)
            changed += 1
        elif not adapter.has_qk_norm and (
            name.endswith("q_proj.weight")
            or name.endswith("k_proj.weight")
            or name.endswith("q_b_proj.weight")
            or name.endswith("kv_b_proj.weight")
        ):
            param.mul_(scale)
            changed += 1
    return changed


def create_model(arch: str, preset_name: str, out: Path, seed: int = 0, force: bool = False) -> Path:
    """Build, initialise and save a random-init checkpoint (config, safetensors, tokenizer) to `out`."""
    names = [a.name for a in ADAPTERS]
    if arch not in names:
        raise HarnessError(f"unknown architecture {arch!r}; choose one of: {', '.join(names)}")
    if preset_name not in PRESETS:
        raise HarnessError(f"unknown preset {preset_name!r}; choose one of: {', '.join(PRESETS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise HarnessError(f"{out} exists and is not empty; pass --force to replace it")
        shutil.rmtree(out)
    adapter = adapter_for_model_type(arch)
    preset = PRESETS[preset_name]
    config = _config(adapter, preset, seed)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    changed = _sharpen_attention(model, adapter, preset.hidden)
    if changed == 0:
        raise AssertionError(f"routing-realism fix found no attention tensors in {arch}")
    model = model.to(preset.dtype)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    build_tokenizer(preset.vocab).save_pretrained(tmp)
    (tmp / "harness_model.json").write_text(
        json.dumps(
            {"arch": arch, "preset": preset_name, "seed": seed, "random_init": True, "attention_gain": ATTENTION_GAIN},
            indent=2,
        )
        + "\n"
    )
    tmp.replace(out)
    log.info("created %s (%s, %s preset) in %s", arch, adapter.model_types[0], preset_name, out)
    return out
