"""Architecture adapters: where routers and experts live in the module tree and in checkpoint keys.

transformers 5 keeps each MoE layer's experts as one module with fused 3D parameters
(`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) and a forward(hidden, top_k_index, top_k_weights);
on disk it writes per-expert 2D keys (`...experts.{e}.w1.weight` for Mixtral, `...experts.{e}.gate_proj.weight`
for the Qwen family, OLMoE and DeepSeek-V2). An adapter maps both key shapes to (layer, expert, role),
renames the non-expert keys to the in-memory names, and finds the experts modules to replace.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from harness.errors import HarnessError

EXPERT_TENSORS = ("gate_up_proj", "down_proj")
"""Order of an expert's tensors inside its packed blob, in the in-memory layout of transformers."""


@dataclass(frozen=True)
class ArchAdapter:
    name: str
    model_types: tuple[str, ...]
    num_experts_attr: str
    expert_intermediate_attr: str
    roles: dict[str, str]
    """Per-expert checkpoint projection name -> gate | up | down."""
    renames: tuple[tuple[str, str], ...] = ()
    """Checkpoint -> in-memory substring renames of non-expert keys."""
    has_qk_norm: bool = False

    def expert_key(self, key: str) -> tuple[int, int | None, str] | None:
        """(layer, expert or None when fused, role) for an expert tensor key, else None."""
        match = _PER_EXPERT.match(key)
        if match:
            role = self.roles.get(match.group(3))
            return (int(match.group(1)), int(match.group(2)), role) if role else None
        match = _FUSED.match(key)
        if match:
            return int(match.group(1)), None, match.group(2)
        return None

    def memory_key(self, key: str) -> str:
        for old, new in self.renames:
            key = key.replace(old, new)
        return key


_PER_EXPERT = re.compile(r"^(?:model\.)?layers\.(\d+)\.[a-z_]+\.experts\.(\d+)\.([a-z0-9_]+)\.weight$")
_FUSED = re.compile(r"^(?:model\.)?layers\.(\d+)\.[a-z_]+\.experts\.(gate_up_proj|down_proj)$")
_QWEN_ROLES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

ADAPTERS: tuple[ArchAdapter, ...] = (
    ArchAdapter(
        "mixtral",
        ("mixtral",),
        "num_local_experts",
        "intermediate_size",
        {"w1": "gate", "w3": "up", "w2": "down"},
        ((".block_sparse_moe.", ".mlp."),),
    ),
    ArchAdapter("qwen2_moe", ("qwen2_moe",), "num_experts", "moe_intermediate_size", _QWEN_ROLES),
    ArchAdapter("qwen3_moe", ("qwen3_moe",), "num_experts", "moe_intermediate_size", _QWEN_ROLES, has_qk_norm=True),
    ArchAdapter("olmoe", ("olmoe",), "num_experts", "intermediate_size", _QWEN_ROLES, has_qk_norm=True),
    ArchAdapter("deepseek_v2", ("deepseek_v2",), "num_experts", "moe_intermediate_size", _QWEN_ROLES),
)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for_model_type(model_type: str) -> ArchAdapter:
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise HarnessError(
        f"model_type {model_type!r} is not a supported Mixture-of-Experts architecture "
        f"(supported: {', '.join(supported_model_types())})"
    )


def load_config(model_dir: Path) -> PretrainedConfig:
    """The checkpoint's config through transformers (attribute maps applied), after `read_config`'s checks."""
    raw = read_config(model_dir)
    adapter_for_model_type(raw.get("model_type", "?"))
    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as exc:
        # StrictDataclassError: a field of the wrong type (e.g. "hidden_size": "x"); one line of its message.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HarnessError(f"{model_dir}/config.json cannot be read by transformers ({first})") from None


def read_config(model_dir: Path) -> dict:
    """The checkpoint's config.json as a dict, with clear errors for a missing or broken one."""
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise HarnessError(f"model folder {model_dir} does not exist")
    if not path.is_file():
        raise HarnessError(f"{model_dir} has no config.json: not a Hugging Face checkpoint folder")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HarnessError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise HarnessError(f"{path} holds a JSON {type(config).__name__}, not an object: not a model config")
    return config


def experts_modules(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    """Decoder layer index -> (parent module, attribute name) of each fused experts module."""
    found: dict[int, tuple[nn.Module, str]] = {}
    layers = model.get_decoder().layers
    for index, layer in enumerate(layers):
        for parent in layer.modules():
            child = getattr(parent, "experts", None)
            if isinstance(child, nn.Module) and all(hasattr(child, t) for t in EXPERT_TENSORS):
                found[index] = (parent, "experts")
                break
    return found
