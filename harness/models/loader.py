"""Builds a real transformers model whose MoE experts are replaced, loading only the non-expert weights.

The model skeleton is created without allocating parameters (accelerate's empty-weights context;
buffers such as rotary frequencies are real), each experts module is swapped for the caller's
replacement, and the packed non-expert weights are assigned in place.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from harness.errors import HarnessError
from harness.models.adapters import experts_sites, load_config
from harness.models.quant import FORMATS, MXFP4, round_trip
from harness.store.layout import PackIndex

ReplaceExperts = Callable[[int, nn.Module], nn.Module]


def load_skeleton_with_experts_replaced(
    model_dir: Path, dense_file: Path, index: PackIndex, replace: ReplaceExperts
) -> tuple[PreTrainedModel, PretrainedConfig]:
    config = load_config(model_dir)
    dtype = getattr(torch, index.dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    found = experts_sites(model)
    if sorted(found) != index.moe_layers:
        raise HarnessError(
            f"the model has MoE layers {sorted(found)} but the pack has {index.moe_layers}; "
            "re-run `harness model pack --force`"
        )
    for layer, site in found.items():
        site.parent.experts = replace(layer, site.module)
    try:
        state = load_file(str(dense_file))
    except FileNotFoundError:
        raise HarnessError(f"{dense_file} not found: run `harness model pack` first") from None
    except Exception as exc:  # safetensors raises its own error type for a corrupt file
        raise HarnessError(f"{dense_file} is corrupt ({exc}); re-run `harness model pack --force`") from None
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shapes of the packed weights differ from the model config.json builds
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise HarnessError(
            f"{model_dir}/config.json does not describe the checkpoint's non-expert weights "
            f"({first.rstrip('.')}): was config.json edited, or does it belong to another checkpoint?"
        ) from None
    if result.unexpected_keys:
        raise HarnessError(f"non-expert weights not in the model: {result.unexpected_keys[:3]}...")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    still_empty = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if still_empty:
        raise HarnessError(f"the checkpoint lacks weights {still_empty[:3]}: it is incomplete or corrupt")
    model.eval()
    return model, config


M = TypeVar("M", bound=nn.Module)


def into_process_memory(model: M) -> M:
    """`model` with every parameter and buffer copied into the process's own memory. transformers maps a safetensors
    checkpoint's tensors from the file (on olmoe-small, 2.36 of the 2.55 GB of weights), so a weight the page cache
    has dropped is read from the disk when first used: a measurement of compute alone must not page weights in."""
    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                param.data = param.data.clone()
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.clone()
    return model


def reference_model(model_dir: Path, index: PackIndex | None = None) -> PreTrainedModel:
    """The fully resident transformers model, with the eager experts implementation the engine mirrors; for
    a quantized pack (`index`), its expert weights are the pack's (quantized, then dequantized)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a measuring run prints its own output only (--json on stdout stays parseable)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, experts_implementation="eager")
    fmt = FORMATS.get(index.expert_dtype) if index is not None else None
    # An MXFP4 checkpoint's experts are dequantized by transformers' own loader (on CPU, or without its kernels).
    if fmt is not None and fmt is not MXFP4:
        with torch.no_grad():
            for site in experts_sites(model).values():
                for name in site.params:
                    param = getattr(site.module, name)
                    if param.dim() == 3:
                        param.copy_(torch.stack([round_trip(w, fmt, index.group_size) for w in param]))  # type: ignore[union-attr,arg-type]
    return model.eval()
