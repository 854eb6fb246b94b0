"""Strategies: a named bundle of a cache policy, an optional prefetcher and an optional placement planner.

A strategy builds the expert source the offloaded layers read from and may watch (or, when approximate,
change) each MoE layer's routing through `before_experts` / `after_experts`. It reports its name,
parameters, its deviations from the paper it follows, and its own statistics in the result's
"strategy" section. Strategies register by name like policies; `harness run --strategy NAME[:ARGS]`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch
from torch import nn

from harness.errors import HarnessError
from harness.keys import ExpertKey, Scope
from harness.models.adapters import decoder_layers
from harness.runtime.offloaded import ExpertSource, OffloadedExperts, Routing

if TYPE_CHECKING:
    from harness.runtime.engine import OffloadEngine
    from harness.store.layout import PackIndex


@dataclass(frozen=True)
class CacheRequest:
    """What the run resolved for the expert memory: slots per eviction group and how to fill them."""

    slots: int
    scope: Scope
    policy: str
    seed: int
    io_threads: int
    budgeted: bool = False
    """Whether `slots` is a memory bound (--cache-experts or --ram-budget): memory a strategy keeps beside its
    expert slots (the shadow model) then comes out of them; else it is reported beside them."""
    kv_cache_bytes: int = 0
    """The model's KV cache at the run's longest sequence (a strategy's copy of the model keeps one as large)."""
    budget_slots: int = 0
    """The expert slots the budget holds in all eviction groups; with --ram-budget also past the model's experts
    (`slots` stops there): what a strategy's memory beside its expert slots comes out of."""


class Strategy(ABC):
    name: ClassVar[str]
    exact: ClassVar[bool] = True
    """False where the strategy changes what the model computes (its result reports token agreement)."""
    forced_scope: ClassVar[Scope | None] = None
    """The eviction scope the strategy's design prescribes, overriding the spec's, or None."""
    parameters: ClassVar[dict[str, object]] = {}
    """Parameter name -> default; the type of the default is the parameter's type."""
    positional: ClassVar[str | None] = None
    """The parameter a bare argument sets (e.g. 'fiddler:trace.parquet' sets `trace`)."""
    has_hooks: ClassVar[bool] = True
    uses_spec_policy: ClassVar[bool] = True
    """False where the strategy fixes its own placement (static, or no cache) and ignores the spec's policy."""

    def __init__(self, params: dict[str, object]) -> None:
        self.params = params
        self.deviations: list[str] = []
        self.approximate = not self.exact
        """Whether approximate behaviour is on; the agreement pass turns it off to get the exact tokens."""

    @classmethod
    def parse(cls, argument: str | None) -> dict[str, object]:
        """'k=v,k=v' (or one bare value for `positional`) -> typed parameters, defaults filled in."""
        params = dict(cls.parameters)
        for item in filter(None, (argument or "").split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                if cls.positional is None:
                    raise HarnessError(f"strategy {cls.name!r} takes key=value arguments (got {item!r})")
                key, value = cls.positional, item
            key = key.strip()
            if key not in cls.parameters:
                known = ", ".join(cls.parameters) or "none"
                raise HarnessError(f"strategy {cls.name!r} has no parameter {key!r} (parameters: {known})")
            default = cls.parameters[key]
            try:
                params[key] = value if default is None or isinstance(default, str) else type(default)(value)
            except ValueError:
                raise HarnessError(
                    f"strategy {cls.name!r}: {key}={value!r} is not a {type(default).__name__}"
                ) from None
        return params

    @abstractmethod
    def build(self, engine: OffloadEngine, request: CacheRequest) -> ExpertSource:
        """Create the expert source (and whatever the strategy keeps beside it) for `engine`."""

    def check_pack(self, index: PackIndex) -> None:  # noqa: B027 - optional
        """Refuse, before any load, a pack the strategy cannot run on."""

    def check_budget(self, index: PackIndex, budget_slots: int, kv_cache_bytes: int) -> None:  # noqa: B027 - optional
        """Refuse, before any load, a budget of `budget_slots` expert slots in all (`CacheRequest.budget_slots`) that
        cannot hold what the strategy keeps beside its expert slots (`kv_cache_bytes`: the model's KV cache, longest
        sequence)."""

    def before_experts(self, module: OffloadedExperts, hidden_states: torch.Tensor, routing: Routing) -> Routing:
        return routing

    def after_experts(self, module: OffloadedExperts) -> None:  # noqa: B027 - optional hook
        """A layer's experts are done."""

    def finish(self) -> None:  # noqa: B027 - optional hook
        """The measured part of the run is over (close open intervals of the strategy's counters)."""

    def stats(self) -> dict[str, object]:
        return {}

    def describe(self) -> dict[str, object]:
        """The result's "strategy" section."""
        return {
            "name": self.name,
            "exact": self.exact,
            "parameters": self.params,
            "deviations": self.deviations,
            "stats": self.stats(),
        }


S = TypeVar("S", bound=type[Strategy])
_STRATEGIES: dict[str, type[Strategy]] = {}
PEERS = ("accelerate", "llama.cpp")
"""Strategies run by another engine (harness.peers) instead of the offload engine."""


def register_strategy(cls: S) -> S:
    if cls.name in _STRATEGIES:
        raise ValueError(f"strategy name {cls.name!r} registered twice")
    _STRATEGIES[cls.name] = cls
    return cls


def _load_builtin() -> None:
    import harness.runtime.strategies  # noqa: F401 - registers the built-in strategies


def strategy_names() -> list[str]:
    _load_builtin()
    return sorted([*_STRATEGIES, *PEERS])


def split_spec(spec: str) -> tuple[str, str | None]:
    name, _, argument = spec.partition(":")
    return name.strip().lower(), (argument or None)


def make_strategy(spec: str) -> Strategy:
    """The strategy for 'name' or 'name:args'; a one-line error listing the names for anything else."""
    _load_builtin()
    name, argument = split_spec(spec)
    if name in PEERS:
        raise HarnessError(f"strategy {name!r} is a peer engine, not a strategy of the offload engine")
    if name not in _STRATEGIES:
        raise HarnessError(f"unknown strategy {name!r}; known strategies: {', '.join(strategy_names())}")
    cls = _STRATEGIES[name]
    return cls(cls.parse(argument))


def check_strategy(spec: str) -> None:
    """Validate a strategy spec (name and arguments) before anything is loaded."""
    if split_spec(spec)[0] not in PEERS:
        make_strategy(spec)


class GatePredictor:
    """Applies a later MoE layer's router to an earlier layer's MoE input: the next-layer-gate predictor
    of mixtral-offloading, AdapMoE and DAOP (`distance` > 1 looks further ahead)."""

    def __init__(self, engine: OffloadEngine) -> None:
        self.routers = engine.routers
        self.layers = engine.index.moe_layers
        self.top_k = engine.index.top_k
        self._position = {layer: i for i, layer in enumerate(self.layers)}
        if set(self.routers) != set(self.layers):
            raise HarnessError("this architecture's routers were not found beside its experts: no gate prediction")

    def target(self, layer: int, distance: int = 1) -> int | None:
        """The MoE layer `distance` MoE layers after `layer`, or None past the last."""
        i = self._position[layer] + distance
        return self.layers[i] if i < len(self.layers) else None

    def position(self, layer: int) -> int:
        return self._position[layer]

    @torch.no_grad()
    def predict(self, target: int, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits, top-k weights, top-k indices) of `target`'s router on `hidden_states` [T, H]."""
        logits, weights, indices = self.routers[target](hidden_states)
        return logits, weights, indices


@dataclass
class Recall:
    """Prediction quality over decode steps: recall = predicted and used / used."""

    predictions: int = 0
    used: int = 0
    predicted_and_used: int = 0
    predicted: int = 0

    def add(self, predicted: set[int], actual: set[int]) -> None:
        self.predictions += 1
        self.used += len(actual)
        self.predicted += len(predicted)
        self.predicted_and_used += len(predicted & actual)

    def to_dict(self) -> dict[str, object]:
        return {
            "predictions": self.predictions,
            "recall": self.predicted_and_used / self.used if self.used else None,
            "precision": self.predicted_and_used / self.predicted if self.predicted else None,
            "predicted_keys": self.predicted,
            "used_keys": self.used,
        }


def layer_experts(top_k_index: torch.Tensor) -> set[int]:
    return set(top_k_index.reshape(-1).tolist())


def top_deviations(top: int, top_k: int, num_experts: int) -> list[str]:
    """The result's deviation line for a prediction read only in part or widened (`top=N`, at most to every expert),
    or none."""
    if 0 < top < top_k:
        return [
            f"reads only each token's {top} heaviest predicted experts of its {top_k} (the whole prediction keeps "
            "its slots and is scored for recall), where the published predictor reads them all"
        ]
    if top > top_k:
        return [
            f"widened prediction: each token's {top_k} predicted experts and its {min(top, num_experts) - top_k} next "
            f"highest router logits are read, kept and scored, where the published predictor reads its {top_k}"
        ]
    return []


def likely_experts(weights: torch.Tensor, indices: torch.Tensor, top: int) -> set[int]:
    """The experts among each token's `top` heaviest of its routed top-k (weights and ids [T, k], as a `Router`
    returns them); all of them when `top` is 0 or at least k. A prediction's heavier experts are the likelier
    to be routed (on olmoe-small's decode, rank 1 of the look-ahead is right 88% of the time, rank 8 42%), so
    a smaller `top` trades recall for precision: fewer bytes read for nothing where the disk is the limit."""
    if 0 < top < indices.shape[-1] and weights.shape == indices.shape:
        indices = indices.gather(-1, weights.argsort(dim=-1, descending=True)[..., :top])
    return layer_experts(indices)


def widened(logits: torch.Tensor, indices: torch.Tensor, top: int) -> torch.Tensor:
    """Each token's routed experts (ids [T, k]) and its `top - k` highest router logits (logits [T, E]) among the
    others, as ids [T, top] (at most E): the router's next likeliest choices, for a prediction read wider than k."""
    k, experts = indices.shape[-1], logits.shape[-1]
    extra = min(top, experts) - k
    if extra <= 0:
        return indices
    others = logits.scatter(-1, indices, float("-inf")).topk(extra, dim=-1).indices
    return torch.cat([indices, others], dim=-1)


def prediction_reads(
    layer: int, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, top: int
) -> tuple[set[int], list[int], tuple[ExpertKey, ...]]:
    """A prediction of `layer`'s routing (router logits [T, E], weights and ids [T, k]) as a prefetch takes it: the
    predicted experts (scored for recall), those to read (in order), and the keys whose slots the prefetch must keep.
    `top` below k reads each token's `top` heaviest (`likely_experts`) and keeps the whole prediction (a resident
    expert predicted below `top` is not evicted for a likelier one); above k the prediction is `widened` to `top`
    experts per token, all read, kept and scored."""
    if top > indices.shape[-1]:
        predicted = layer_experts(widened(logits, indices, top))
        read = sorted(predicted)
        return predicted, read, tuple((layer, e) for e in read)
    predicted = layer_experts(indices)
    return predicted, sorted(likely_experts(weights, indices, top)), tuple((layer, e) for e in sorted(predicted))


def protect_keys(layer: int, routing: Routing) -> tuple[ExpertKey, ...]:
    """The keys a layer's step in flight uses: a prefetch must not take their slots."""
    return tuple((layer, e) for e in sorted(layer_experts(routing.top_k_index)))


def before_attention(engine: OffloadEngine, callback: Callable[[OffloadedExperts, torch.Tensor, dict], None]) -> None:
    """Call `callback(module, hidden_states, kwargs)` when each MoE decoder layer starts, before its attention
    block: its input (the residual stream) and the keyword arguments of the layer's call (positions, masks,
    KV cache). The hooks stay for the engine's life (a strategy is built once per engine)."""
    layers = decoder_layers(engine.model)
    for module in engine.modules:

        def hook(_: nn.Module, args: tuple, kwargs: dict, module: OffloadedExperts = module) -> None:
            with torch.no_grad():
                callback(module, args[0] if args else kwargs["hidden_states"], kwargs)

        layers[module.layer].register_forward_pre_hook(hook, with_kwargs=True)


_PRE_MOE_NORMS = (
    "pre_feedforward_layernorm",
    "pre_mlp_layernorm",
    "pre_ff_layernorm",
    "ffn_norm",
    "post_attention_layernorm",
)
"""Decoder-layer norms applied to the residual stream right before the MoE block, by architecture: a sandwich
norm's `pre_*` one first (AFMoE also has a post_attention_layernorm, applied to the attention output), LFM2's
`ffn_norm`, Jamba's `pre_ff_layernorm`, else the usual `post_attention_layernorm`."""
_POST_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm")
_ATTENTION_OUTPUT_NORMS = ("post_self_attn_layernorm",)
"""A sandwich norm's attention-output norm under a name of its own (Kolibri): post_attention_layernorm is then the
norm before the MoE block, even beside a post-MoE norm."""


class CollapsedThenNormed(nn.Module):
    """The MoE input of a layer with hyper-connections (DeepSeek-V4's mHC, Hunyuan-V4's): the residual stream is
    `hc_mult` streams [..., hc_mult, H], which the layer's `ffn_hc` collapses into one (its last output) before
    the pre-MoE norm."""

    def __init__(self, hyper_connection: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.hyper_connection, self.norm = hyper_connection, norm

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        return self.norm(self.hyper_connection(residual)[-1])


def moe_input_norm(engine: OffloadEngine, layer: int) -> nn.Module:
    """What a MoE decoder layer applies to its residual stream before its router, to apply the router to other
    hidden states: the pre-MoE norm; none (identity) in a post-norm layer (FlexOlmo: the MoE block reads the
    residual stream); the input norm in a parallel layer (Cohere: attention and MoE read the same normed input);
    the hyper-connection's collapse, then the norm, where the residual stream is several (`CollapsedThenNormed`)."""
    decoder = decoder_layers(engine.model)[layer]
    norm = _pre_moe_norm(decoder)
    hyper_connection = getattr(decoder, "ffn_hc", None)
    return norm if hyper_connection is None else CollapsedThenNormed(hyper_connection, norm)


def _pre_moe_norm(decoder: nn.Module) -> nn.Module:
    post_norm = any(hasattr(decoder, name) for name in _POST_NORMS) and not any(
        hasattr(decoder, name) for name in _ATTENTION_OUTPUT_NORMS
    )
    # In a post-norm layer, post_attention_layernorm normalises the attention output, not the MoE input.
    for name in _PRE_MOE_NORMS[:-1] if post_norm else _PRE_MOE_NORMS:
        if isinstance(getattr(decoder, name, None), nn.Module):
            return getattr(decoder, name)
    if post_norm:
        return nn.Identity()
    if isinstance(getattr(decoder, "input_layernorm", None), nn.Module):
        return decoder.input_layernorm
    raise HarnessError(f"{type(decoder).__name__} has no known norm before its MoE block: no look-ahead prediction")
