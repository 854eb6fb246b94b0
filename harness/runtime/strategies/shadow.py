"""OD-MoE's emulative predictor: a quantised shadow copy of the model that runs each token ahead of the real model and
tells which experts the real model's later layers will route to.

The shadow holds every decoder layer of the model (attention, norms, router and all experts) with its matrices stored
as int8 (symmetric, one scale per output row) or fp16, dequantised to the model's dtype for each use; its matrices
outside the experts (attention, shared experts: `dense`) may keep another precision than its experts (OD-MoE
quantises the whole shadow alike). It keeps its own KV cache. Each token it is re-aligned with the real model: when
the real model starts its first MoE layer, the shadow takes the real hidden state there and runs its own layers from
it, `distance` layers ahead of the real model (at real layer l's start it runs layer l+distance). Its routing of
layer j is the prediction for the real layer j. During prefill it runs over the prompt once, to fill its KV cache. It
runs on the caller's thread, so its compute is on the run's timeline. Under a memory budget its bytes (weights and KV
cache) come out of the budget's expert slots (`fit_budget`).
"""

from __future__ import annotations

import inspect
import math
import time
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache

from harness.errors import HarnessError
from harness.iomem import IoBuffer
from harness.models.adapters import decoder_layers
from harness.models.loader import load_skeleton_with_experts_replaced
from harness.runtime.expert_cache import slot_views
from harness.runtime.generation import KV_CACHE_KEYWORDS, kv_cache_keyword
from harness.runtime.offloaded import ExpertMath, expert_forward
from harness.units import format_bytes

if TYPE_CHECKING:
    from harness.runtime.engine import OffloadEngine
    from harness.store.layout import PackIndex

ShadowPrecision = Literal["int8", "fp16"]


def quantize(weight: torch.Tensor, precision: ShadowPrecision) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(stored tensor, per-row scale or None): int8 symmetric per output row (last dim reduced), or fp16."""
    if precision == "fp16":
        return weight.to(torch.float16).clone(), None
    w = weight.float()
    scale = (w.abs().amax(dim=-1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale.to(torch.float16)


def dequantize(stored: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    return stored.to(dtype) if scale is None else stored.to(dtype) * scale.to(dtype)


class QuantLinear(nn.Module):
    """nn.Linear with its weight stored quantised; dequantised for each call. Model code that reads a linear layer's
    `weight` (its dtype, or the matrix itself: Hunyuan's and the DSA indexers' projections) gets the dequantised
    matrix in the original dtype."""

    def __init__(self, linear: nn.Linear, precision: ShadowPrecision) -> None:
        super().__init__()
        stored, scale = quantize(linear.weight.detach(), precision)
        self.register_buffer("stored", stored)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.dtype = linear.weight.dtype

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.stored, self.scale, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.stored, self.scale, x.dtype), self.bias)


def plain_linear(module: nn.Module) -> bool:
    """A linear layer whose arithmetic is nn.Linear's own, which QuantLinear reproduces. A subclass with its own
    forward (Phi-3.5-MoE's router, DeepSeek-V4's grouped output projection) keeps the model's precision."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _members(value: object) -> list[object]:
    """The items of a list, tuple or dict (its values), else the value alone."""
    if isinstance(value, dict):
        return list(value.values())
    return list(value) if isinstance(value, list | tuple) else [value]


def cache_tensors(cache: object) -> list[torch.Tensor]:
    """Every tensor a KV cache holds: its layers' keys and values and any other state (linear-attention and
    convolution states, compressed keys), in its layers' and its own attributes, up to two containers deep."""
    found: list[torch.Tensor] = []
    for holder in [cache, *getattr(cache, "layers", [])]:
        for value in vars(holder).values():
            for item in _members(value):
                found += [t for t in _members(item) if isinstance(t, torch.Tensor)]
    return found


class ShadowExperts(nn.Module):
    """All experts of one layer, quantised; computes like the real layer and records its routing."""

    def __init__(self, layer: int, num_experts: int, math: ExpertMath, weights: dict[str, tuple]) -> None:
        super().__init__()
        self.layer, self.num_experts, self.math = layer, num_experts, math
        self.names = list(weights)
        for name, (stored, scale) in weights.items():
            self.register_buffer(f"{name}_stored", stored)
            self.register_buffer(f"{name}_scale", scale)
        self.routed: set[int] = set()

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        self.routed = set(top_k_index.reshape(-1).tolist())
        out = torch.zeros_like(hidden_states)
        for expert in sorted(self.routed):
            token_idx, pos = torch.where(top_k_index == expert)
            weights = {}
            for n in self.names:
                scale = getattr(self, f"{n}_scale")
                weights[n] = dequantize(
                    getattr(self, f"{n}_stored")[expert], None if scale is None else scale[expert], out.dtype
                )
            rows = expert_forward(self.math, weights, hidden_states[token_idx], top_k_weights[token_idx, pos, None])
            out.index_put_((token_idx,), rows.to(out.dtype), True)  # index_add_ opens an OpenMP region per call
        return out


def _stacked_experts(engine: OffloadEngine, layer: int, precision: ShadowPrecision) -> dict[str, tuple]:
    """Layer `layer`'s experts read from the pack (one expert at a time) and quantised, stacked per tensor."""
    index = engine.index
    buffer = IoBuffer(index.stride_bytes)
    try:
        (view,) = slot_views(buffer.view, index, 1)
        parts: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]] = {t.name: [] for t in index.tensors}
        for expert in range(index.num_experts):
            engine.reader.read_into((layer, expert), buffer.view)
            for name, tensor in view.items():
                parts[name].append(quantize(tensor, precision))
        del view
    finally:
        buffer.close()
    return {
        name: (
            torch.stack([s for s, _ in pieces]),
            None if pieces[0][1] is None else torch.stack([c for _, c in pieces]),
        )
        for name, pieces in parts.items()
    }


def check_unquantized(index: PackIndex) -> None:
    """The shadow quantises the model's own expert weights, as read from the pack: a pack whose experts are
    stored quantized (int8, int4, MXFP4) holds integer codes and scales, not weights, and is refused."""
    if index.expert_dtype not in ("", index.dtype):
        raise HarnessError(
            f"the shadow predictor quantises the model's expert weights, but this pack stores them as "
            f"{index.expert_dtype}: run it on a pack of the model's own dtype ({index.dtype}), or use the gate "
            "predictor"
        )


def shadow_expert_bytes(index: PackIndex, precision: ShadowPrecision) -> int:
    """Bytes the shadow's experts take (every MoE layer's, quantised as `_stacked_experts` stores them),
    from the pack's index alone: `quantize` applied to shape-only (meta) tensors."""
    check_unquantized(index)
    per_expert = 0
    for t in index.tensors:
        stored, scale = quantize(
            torch.empty(t.shape, dtype=getattr(torch, t.dtype or index.dtype), device="meta"), precision
        )
        per_expert += stored.nbytes + (0 if scale is None else scale.nbytes)
    return per_expert * index.num_experts * len(index.moe_layers)


class ShadowModel:
    """The shadow's decoder layers, its KV cache, and where it stands in the current token."""

    def __init__(
        self, engine: OffloadEngine, precision: ShadowPrecision, distance: int, dense: ShadowPrecision | None = None
    ) -> None:
        check_unquantized(engine.index)
        self.precision, self.distance = precision, distance
        self.dense: ShadowPrecision = dense or precision
        """The precision of the shadow's linear layers outside its experts."""
        self.experts: dict[int, ShadowExperts] = {}

        def replace(layer: int, original: nn.Module) -> nn.Module:
            # The model's own expert arithmetic; the shadow dequantizes its weights itself (quant=None here).
            math = ExpertMath(original, engine.index.expert_params, None, getattr(torch, engine.index.dtype))
            module = ShadowExperts(layer, engine.index.num_experts, math, _stacked_experts(engine, layer, precision))
            self.experts[layer] = module
            return module

        skeleton, config = load_skeleton_with_experts_replaced(
            engine.model_dir, engine.dense_file, engine.index, replace
        )
        layers = decoder_layers(skeleton)
        self.kept_linear: list[str] = []
        """Classes of the linear layers with a forward of their own, kept at the model's precision (one per layer)."""
        for layer in layers:
            for parent in list(layer.modules()):
                for name, child in list(parent.named_children()):
                    if plain_linear(child):
                        setattr(parent, name, QuantLinear(child, self.dense))
                    elif isinstance(child, nn.Linear):
                        self.kept_linear.append(type(child).__name__)
        self.layers = nn.ModuleList(list(layers)).eval().to(engine.device)  # beside the real model's hidden states
        self._kv_keyword = kv_cache_keyword(self.layers[0].forward)
        """The keyword the layers take the KV cache by, by their signature (where the real call passed none)."""
        del skeleton  # the embeddings and the head are the real model's concern
        self.config = config
        self.first = min(engine.index.moe_layers)
        self.nbytes = sum(t.numel() * t.element_size() for t in [*self.layers.parameters(), *self.layers.buffers()])
        self.kv = DynamicCache(config=config)
        self.kv_peak_bytes = 0
        """The largest the shadow's KV cache grew (its keys and values; measured at each sequence's end)."""
        self.compute_s = {"prefill": 0.0, "decode": 0.0}
        """Wall time the shadow ran, per phase: on the model's thread, so part of the run's time."""
        self._hidden: torch.Tensor | None = None
        self._next = 0
        self._token = -1

    def _cache_key(self, kwargs: dict) -> str:
        """The keyword the real model passed its cache to the layer by: the shadow's cache takes its place there (the
        layer's signature decides only where neither is passed). DeepSeek-V4's layers take **kwargs, so their
        signature names neither; the shadow's cache, passed by the other name, sat beside the real one, which the
        layer then used."""
        return next((key for key in KV_CACHE_KEYWORDS if key in kwargs), self._kv_keyword)

    def _fresh_cache(self, real: object) -> DynamicCache:
        """An empty cache of the real model's cache class: MiniMax keeps its linear-attention state in its own."""
        cls = type(real) if isinstance(real, DynamicCache) else DynamicCache
        takes_config = "config" in inspect.signature(cls.__init__).parameters
        return cls(config=self.config) if takes_config else cls()

    def _run(self, layer: int, kwargs: dict) -> None:
        assert self._hidden is not None
        call = {k: v for k, v in kwargs.items() if k not in KV_CACHE_KEYWORDS}
        call[self._cache_key(kwargs)] = self.kv
        out = self.layers[layer](self._hidden, **call)
        self._hidden = out[0] if isinstance(out, tuple) else out

    def kv_bytes(self) -> int:
        """Bytes the shadow's KV cache holds now (keys, values and any other state it keeps)."""
        return sum(t.numel() * t.element_size() for t in cache_tensors(self.kv))

    def note_kv(self) -> None:
        """Fold the KV cache's present size into `kv_peak_bytes` (it only grows within a sequence)."""
        self.kv_peak_bytes = max(self.kv_peak_bytes, self.kv_bytes())

    @torch.no_grad()
    def prefill(self, hidden: torch.Tensor, kwargs: dict) -> None:
        """A new sequence: a fresh KV cache, filled by running every shadow layer over the prompt."""
        start = time.perf_counter()
        self.note_kv()  # the previous sequence's cache, at its longest
        self.kv = self._fresh_cache(kwargs.get(self._cache_key(kwargs)))
        self._hidden = hidden
        for layer in range(self.first, len(self.layers)):
            self._run(layer, kwargs)
        self._token = -1
        self.compute_s["prefill"] += time.perf_counter() - start

    @torch.no_grad()
    def advance(self, now: int, layer: int, hidden: torch.Tensor, kwargs: dict) -> list[tuple[int, set[int]]]:
        """The real model starts decoder `layer` of token step `now` with `hidden`: re-align at the token's
        first MoE layer, then run the shadow up to `layer + distance`; (layer, routed experts) of each
        MoE layer the shadow ran."""
        start = time.perf_counter()
        if now != self._token:
            self._token, self._hidden, self._next = now, hidden, layer
        ran = []
        last = min(layer + self.distance, len(self.layers) - 1)
        while self._next <= last:
            self._run(self._next, kwargs)
            if self._next in self.experts:
                ran.append((self._next, self.experts[self._next].routed))
            self._next += 1
        self.compute_s["decode"] += time.perf_counter() - start
        return ran


def slots_of(nbytes: int, index: PackIndex) -> int:
    """Expert slots that `nbytes` of memory take from a budget (whole slots of the pack's stride)."""
    return math.ceil(nbytes / index.stride_bytes)


def staging_slots(index: PackIndex) -> int:
    """The slots on-demand stages a step's experts in: top-k per MoE layer."""
    return index.top_k * len(index.moe_layers)


def fit_budget(index: PackIndex, precision: str, shadow_bytes: int, counted: str, budget_slots: int) -> int:
    """Expert slots a budget of `budget_slots` leaves once the shadow's `shadow_bytes` (`counted` says of
    what) come out of it. Refused when the shadow alone does not fit, or leaves fewer than on-demand's staging
    slots (a --cache-experts beyond the model's experts per layer cannot be asked for)."""
    taken, own_slots, groups = slots_of(shadow_bytes, index), staging_slots(index), len(index.moe_layers)
    experts_per_group, stride_bytes = index.num_experts, index.stride_bytes
    need = -(-(taken + own_slots) // groups)
    if need <= experts_per_group:
        advice = f"use --cache-experts {need} (slots per layer) or more, a larger --ram-budget, or the gate predictor"
    else:
        advice = (
            f"no --cache-experts can hold it (it needs {need} slots per layer, the model has {experts_per_group} "
            "experts per layer): use a --ram-budget, or the gate predictor"
        )
    what = (
        f"the {precision} shadow model takes {format_bytes(shadow_bytes)} ({counted}: {taken} expert slots of "
        f"{format_bytes(stride_bytes)})"
    )
    if taken > budget_slots:
        raise HarnessError(f"{what}, more than the budget's {budget_slots} expert slots; {advice}")
    if budget_slots - taken < own_slots:
        raise HarnessError(
            f"{what} and leaves {budget_slots - taken} of the budget's {budget_slots} expert slots, fewer than "
            f"the {own_slots} staging slots on-demand needs; {advice}"
        )
    return budget_slots - taken


def parse_dense(value: str, precision: ShadowPrecision | None) -> ShadowPrecision | None:
    """The `dense` argument of a predictor of `precision` (None: the gate) -> the precision of the shadow's matrices
    outside its experts: 'same' -> `precision`; 'int8' or 'fp16' for a shadow only."""
    if value == "same":
        return precision
    if value not in ("int8", "fp16"):
        raise HarnessError(f"unknown dense precision {value!r}: use same, int8 or fp16")
    if precision is None:
        raise HarnessError("dense= sets the shadow's precision outside its experts: the gate predictor has none")
    return value  # type: ignore[return-value]


def parse_predictor(value: str) -> tuple[str, ShadowPrecision | None]:
    """'gate' -> ('gate', None); 'shadow-int8' / 'shadow-fp16' -> ('shadow', precision)."""
    if value == "gate":
        return "gate", None
    if value in ("shadow-int8", "shadow-fp16"):
        return "shadow", value.split("-")[1]  # type: ignore[return-value]
    raise HarnessError(f"unknown predictor {value!r}: use gate, shadow-int8 or shadow-fp16")
