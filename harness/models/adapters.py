"""Architecture adapters: which transformers MoE architectures run offloaded, and where their experts live.

transformers 5 keeps each MoE layer's routed experts as one module (the `experts` attribute of the MoE
block) whose parameters are stacked per expert (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]; some
architectures add biases or store them transposed or interleaved) and whose forward takes
(hidden_states, top_k_index, top_k_weights). The harness finds those modules in the model's own module
tree and runs the class's own eager forward one expert at a time (harness.runtime.offloaded), so it needs
no per-architecture code: an architecture is an entry in harness.models.archs.SUPPORTED (and a tiny/small
configuration in factory.py), or in its REFUSED with what is missing.

On disk, transformers' `save_pretrained` writes either those stacked tensors or per-expert 2D keys
(`...experts.{e}.w1.weight` for Mixtral, `...experts.{e}.gate_proj.weight` for the Qwen family...).
`plan_checkpoint` maps both shapes to the in-memory layout, tensor by tensor, when it can prove the
mapping from names and shapes alone; otherwise the packer loads the checkpoint through transformers.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from harness.errors import HarnessError
from harness.models.archs import REFUSED, SUPPORTED
from harness.models.quant import MXFP4

_EXPERTS_ATTR = "experts"
_ROLES = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
"""Per-expert checkpoint projection name -> role, for checkpoints that store one 2D tensor per expert."""
_RENAMES = ((".block_sparse_moe.", ".mlp."),)
"""Checkpoint -> in-memory substring renames of non-expert keys (Mixtral-style checkpoints)."""
_PER_EXPERT = re.compile(r"^(?P<module>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>[a-z0-9_]+)\.weight$")
_STACKED = re.compile(r"^(?P<module>.+\.experts)\.(?P<param>[a-z0-9_]+)$")


def supported_model_types() -> list[str]:
    return sorted(SUPPORTED)


def check_model_type(model_type: str) -> None:
    """Refuse an architecture the harness does not run, with the reason."""
    if model_type in SUPPORTED:
        return
    if model_type in REFUSED:
        raise HarnessError(f"model_type {model_type!r} is not supported: {REFUSED[model_type]}")
    raise HarnessError(
        f"model_type {model_type!r} is not a supported Mixture-of-Experts architecture "
        f"(supported: {', '.join(supported_model_types())})"
    )


def load_config(model_dir: Path) -> PretrainedConfig:
    """The checkpoint's config through transformers (attribute maps applied), after `read_config`'s checks."""
    raw = read_config(model_dir)
    check_model_type(raw.get("model_type", "?"))
    quant = raw.get("quantization_config")
    method = quant.get("quant_method", quant) if isinstance(quant, dict) else quant
    if quant and method != MXFP4.name:  # MXFP4 experts are packed in their own format (harness.models.quant)
        raise HarnessError(
            f"{model_dir} holds pre-quantized weights (quantization_config: {method}); the harness packs "
            "unquantized and MXFP4 checkpoints (dequantize it with transformers and save_pretrained, then "
            "`harness model pack --expert-dtype int4|int8`)"
        )
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


def eager_forward(module: nn.Module):  # returns the unbound function of the module's class
    """The experts class's own forward, under transformers' `use_experts_implementation` dispatch."""
    forward = type(module).forward
    return getattr(forward, "__wrapped__", forward)


@dataclass
class ExpertsSite:
    """One MoE layer's routed experts module, found in the model's module tree."""

    layer: int
    path: str
    """Module name in the model, e.g. 'model.layers.3.mlp.experts'."""
    parent: nn.Module
    module: nn.Module
    num_experts: int
    params: dict[str, list[int]] = field(default_factory=dict)
    """Per-expert parameter name -> shape of one expert's slice, in the module's parameter order."""

    @property
    def standard(self) -> bool:
        """gate_up_proj [2I, H] (gate rows then up rows) and down_proj [H, I]: the per-expert checkpoint layout."""
        shapes = self.params
        if set(shapes) != {"gate_up_proj", "down_proj"} or getattr(self.module, "is_transposed", False):
            return False
        if not getattr(self.module, "is_concatenated", True):
            return False
        (two_i, hidden), (hidden2, inter) = shapes["gate_up_proj"], shapes["down_proj"]
        return hidden == hidden2 and two_i == 2 * inter


def experts_sites(model: nn.Module) -> dict[int, ExpertsSite]:
    """Decoder layer index -> its routed experts module (layers without one are dense)."""
    names = {id(m): n for n, m in model.named_modules()}
    found: dict[int, ExpertsSite] = {}
    for index, layer in enumerate(decoder_layers(model)):
        for parent in layer.modules():
            child = getattr(parent, _EXPERTS_ATTR, None)
            if not isinstance(child, nn.Module) or isinstance(child, nn.ModuleList):
                continue
            direct = list(child.named_parameters(recurse=False))
            if not direct:
                continue
            count = direct[0][1].shape[0]
            if any(p.dim() < 2 or p.shape[0] != count for _, p in direct):
                continue
            params = {n: list(p.shape[1:]) for n, p in direct}
            found[index] = ExpertsSite(index, names[id(child)], parent, child, int(count), params)
            break
    return found


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list (a causal LM's `get_decoder()`, else its first `layers` ModuleList)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList):
            return module
    raise HarnessError(f"{type(model).__name__} has no decoder layer list")


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the generic offloaded forward cannot run this model, or None."""
    sites = experts_sites(model)
    if not sites:
        for module in model.modules():
            if isinstance(getattr(module, _EXPERTS_ATTR, None), nn.ModuleList):
                return "its experts are a ModuleList of per-expert modules, not one stacked experts module"
        return "no routed experts module with stacked per-expert parameters was found"
    for site in sites.values():
        params = list(inspect.signature(eager_forward(site.module)).parameters)
        if len(params) < 4:
            return (
                f"{type(site.module).__name__}.forward({', '.join(params[1:])}) takes no top-k expert index "
                "(every expert runs on every token)"
            )
    return None


def skeleton(config: PretrainedConfig) -> nn.Module:
    """The model with every parameter on the meta device: module tree, names and shapes, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def top_k_of(config: PretrainedConfig) -> int:
    text = config.get_text_config()
    for name in ("num_experts_per_tok", "moe_k", "moe_topk", "top_k"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
        if isinstance(value, list | tuple) and value and isinstance(value[0], int):
            return int(value[0])
    raise HarnessError(f"config.json of model_type {config.model_type!r} names no experts-per-token count")


@dataclass
class CheckpointPlan:
    """Where every tensor of the in-memory model comes from in the checkpoint files."""

    dense: dict[str, str]
    """In-memory name -> checkpoint key of each non-expert tensor."""
    stacked: dict[tuple[int, str], str]
    """(layer, parameter) -> checkpoint key of a stacked [E, ...] expert tensor."""
    per_expert: dict[tuple[int, int], dict[str, str]]
    """(layer, expert) -> role (gate | up | down) -> checkpoint key of a per-expert 2D tensor."""


def plan_checkpoint(
    shapes: dict[str, list[int]], sites: dict[int, ExpertsSite], expected: dict[str, list[int]]
) -> CheckpointPlan | None:
    """Map checkpoint keys (with their shapes) onto the model's tensors from names and shapes alone.

    `expected` holds the in-memory name -> shape of every non-expert tensor the model loads. None when
    any key cannot be placed or any tensor stays unfilled: the checkpoint then needs transformers' own
    conversion (the packer loads it through transformers)."""
    by_path = {site.path: site for site in sites.values()}
    plan = CheckpointPlan({}, {}, {})
    for key, shape in shapes.items():
        memory = key
        for old, new in _RENAMES:
            memory = memory.replace(old, new)
        if memory in expected:
            if expected[memory] != shape:
                return None
            plan.dense[memory] = key
            continue
        match = _STACKED.match(memory)
        site = by_path.get(match.group("module")) if match else None
        if site is not None and match is not None and match.group("param") in site.params:
            if shape != [site.num_experts, *site.params[match.group("param")]]:
                return None
            plan.stacked[(site.layer, match.group("param"))] = key
            continue
        match = _PER_EXPERT.match(memory)
        site = by_path.get(match.group("module")) if match else None
        if site is None or match is None or not site.standard or match.group("proj") not in _ROLES:
            return None
        plan.per_expert.setdefault((site.layer, int(match.group("expert"))), {})[_ROLES[match.group("proj")]] = key
    if set(plan.dense) != set(expected):
        return None
    for site in sites.values():
        stacked = {param for layer, param in plan.stacked if layer == site.layer}
        if stacked == set(site.params):
            continue
        if stacked or not all(
            set(plan.per_expert.get((site.layer, e), {})) == {"gate", "up", "down"} for e in range(site.num_experts)
        ):
            return None
    return plan


def non_expert_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """In-memory name -> tensor of everything the model loads except routed expert parameters; a tensor tied
    to an earlier one (the output embedding) is left out, as save_pretrained leaves it out."""
    experts = {f"{site.path}.{name}" for site in experts_sites(model).values() for name in site.params}
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in experts or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tensor
    return out
