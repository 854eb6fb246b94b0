"""The module that replaces a MoE layer's experts: the model's own router picks experts, this module
fetches their weights through an expert source (the expert cache, or a strategy's mapped file) and
applies the model's own expert math.

On the CPU, with the model's own routing and every needed expert in memory with no read in flight
(`ExpertSource.ready`), a layer is one call of the experts class's own eager forward, its stacked
parameters replaced by a table that looks each expert's weights up in the source: the resident model's
operations in its order, without the per-expert wrapping of the other path. Otherwise (a read to wait for,
weights on another device, a strategy that changes the routing or computed experts early) each expert is
one call of that forward on its own rows, computed as its weights arrive so the compute overlaps the reads
still in flight, and the outputs are summed in ascending expert order as the eager forward sums them. Where the
class's forward is the common gated expert (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I], `act_fn`, no bias),
one expert is those operations alone (`direct_expert`), used only after a probe on random weights found it
bit-identical to the eager forward for that class: the eager forward's routing bookkeeping (one-hot mask, hit list,
gather and scatter, some 14 operators) cost about 100 us per expert on a 2-core CPU, +10 ms per token on
olmoe-small's decode (96 experts).
Either way greedy generation is bit-identical to the fully resident model. A strategy may look at each
layer's input before its experts run (to prefetch or predict) and, if it is approximate, replace the
routing and supply expert outputs it computed early.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from harness.keys import Phase
from harness.models.adapters import eager_forward
from harness.models.quant import QuantFormat, dequantize
from harness.runtime.device import DeviceTimeline, to_device
from harness.store.layout import SCALE_SUFFIX

log = logging.getLogger(__name__)
ExpertWeights = dict[str, torch.Tensor]
Contribution = tuple[torch.Tensor, torch.Tensor]
"""(token indices, weighted expert output rows) of one expert in one layer."""


@dataclass
class StepContext:
    """The logical clock and phase of the forward pass in flight, shared by all offloaded layers."""

    now: int = 0
    phase: Phase = "prefill"
    seq_id: int = 0
    first_pos: int = 0
    events: list = field(default_factory=list)


class RoutingSink(Protocol):
    def record(self, ctx: StepContext, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None: ...


class ExpertSource(Protocol):
    """Where expert weights come from: `ExpertCache` (slots + O_DIRECT reads) or a strategy's mapped file."""

    def ready(self, layer: int, experts: list[int]) -> bool:
        """Whether a `fetch` of `experts` now would wait for no read and yield views that all stay valid to the end
        of the step (no scratch buffer reused): then the layer runs as one call of the model's forward."""
        ...

    def fetch(self, layer: int, experts: list[int], now: int, phase: Phase) -> Iterator[tuple[int, ExpertWeights]]: ...

    def snapshot(self) -> object:
        """A copy of every measured counter (hits, reads, bytes), for an unmeasured pass to be undone."""
        ...

    def restore(self, saved: object) -> None:
        """Put back the counters of `snapshot`."""
        ...


@dataclass
class Routing:
    """The routing a layer computes with, and outputs of experts a strategy already computed."""

    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor
    precomputed: dict[int, Contribution] = field(default_factory=dict)


class LayerHooks(Protocol):
    """A strategy's view of each MoE layer's forward pass (see harness.runtime.strategies)."""

    def before_experts(self, module: OffloadedExperts, hidden_states: torch.Tensor, routing: Routing) -> Routing: ...

    def after_experts(self, module: OffloadedExperts) -> None: ...


class ExpertMath:
    """One expert's arithmetic, taken from the model's own experts module: the class's eager forward,
    called on the rows routed to one expert with that expert's weights in place of the stacked ones.

    The weights are set as views expanded over the expert dimension (no copies), so the forward indexes
    them as it indexes its own parameters, and every operation (biases, transposed or interleaved
    layouts, clamped activations) is the model's own. Quantized weights are dequantized first. Each call
    builds its own stand-in module (a shallow copy of the original's attributes), so strategies may call it
    from another thread.
    """

    def __init__(self, original: nn.Module, params: list[str], quant: QuantFormat | None, dtype: torch.dtype) -> None:
        self._cls = type(original)
        self._forward = eager_forward(original)
        self.signature = inspect.signature(self._forward)
        """The experts class's forward signature: how its MoE block passes (hidden, top-k index, top-k weights)."""
        self._state = dict(original.__dict__)
        self._state["_parameters"] = {k: v for k, v in original._parameters.items() if k not in params}
        self.params, self.quant, self.dtype = params, quant, dtype
        self.num_experts = int(getattr(original, params[0]).shape[0])
        act_fn = getattr(original, "act_fn", None)
        self._act_fn = act_fn if callable(act_fn) else None
        """The gated expert's activation (a submodule or a function), for `direct_expert`; None: no such attribute."""
        self._shapes = {name: tuple(getattr(original, name).shape[1:]) for name in params}
        """One expert's shape of each parameter."""
        settings = tuple(
            sorted((k, v) for k, v in self._state.items() if isinstance(v, (bool, int, float, str, type(None))))
        )
        self._probe_key = (self._cls, tuple(self._shapes.items()), repr(self._act_fn), settings)
        """What a probe's verdict holds for: the class, its expert shapes, its activation and its plain settings (two
        instances of one class may differ in a flag their forward reads, and a probe saw only one of them)."""
        self._direct: dict[tuple[torch.dtype, str], bool] = {}
        """`direct_matches` by (dtype, device type) of the rows: looked up per expert, so kept on the instance."""
        self._whole: bool | None = None
        """`layer_matches` once known."""
        self.timeline: DeviceTimeline | None = None
        """CUDA runs: where copies and computes are timed (harness.runtime.device); None on the CPU."""

    def weights(self, weights: ExpertWeights) -> ExpertWeights:
        """The expert's weights in the compute dtype (dequantized where stored quantized)."""
        out = {}
        for name in self.params:
            scale = weights.get(name + SCALE_SUFFIX)
            tensor = weights[name]
            out[name] = tensor if scale is None else dequantize(tensor, scale, self.quant, self.dtype)  # type: ignore[arg-type]
        return out

    def _proxy(self, params: dict[str, object]) -> nn.Module:
        """A stand-in of the experts module (a shallow copy of its attributes) with `params` as its parameters."""
        proxy = self._cls.__new__(self._cls)
        proxy.__dict__.update(self._state)
        proxy.__dict__.update(params)
        return proxy

    def __call__(
        self, weights: ExpertWeights, current_state: torch.Tensor, routing_weights: torch.Tensor
    ) -> torch.Tensor:
        # The expert computes where its rows are; weights on another device are copied there (harness.runtime.device).
        weights, copied = to_device(weights, current_state.device, self.timeline)
        converted = self.weights(weights)
        act = self._act_fn if self.direct_matches(current_state) else None
        if self.timeline is None or current_state.device.type != "cuda":  # CPU computes are not device spans
            out = self._expert(act, converted, current_state, routing_weights)
        else:
            out = self.timeline.compute(partial(self._expert, act, converted, current_state, routing_weights))
        if copied is not None:
            copied.synchronize()  # the source slot may be rewritten once the caller moves on: its copy must be done
        return out

    def _expert(
        self,
        act: Callable[[torch.Tensor], torch.Tensor] | None,
        weights: ExpertWeights,
        current_state: torch.Tensor,
        routing_weights: torch.Tensor,
    ) -> torch.Tensor:
        """One expert's rows: `direct_expert` with activation `act`, or (None) the eager forward."""
        if act is None:
            return self.eager_expert(weights, current_state, routing_weights)
        return direct_expert(act, weights, current_state, routing_weights)

    def eager_expert(
        self, weights: ExpertWeights, current_state: torch.Tensor, routing_weights: torch.Tensor
    ) -> torch.Tensor:
        """One expert's rows through the class's eager forward: its stacked parameters replaced by `weights` expanded
        over the expert dimension (views), every row routed to expert 0."""
        proxy = self._proxy({name: t.unsqueeze(0).expand(self.num_experts, *t.shape) for name, t in weights.items()})
        index = torch.zeros(current_state.shape[0], 1, dtype=torch.long, device=current_state.device)
        return self._forward(proxy, current_state, index, routing_weights)

    def direct_matches(self, current_state: torch.Tensor) -> bool:
        """Whether `direct_expert` gives this class's eager forward its bits (on rows of `current_state`'s dtype and
        device): checked once per `_probe_key`, dtype and device, on random weights and rows."""
        where = (current_state.dtype, current_state.device.type)
        if where not in self._direct:
            key = (*self._probe_key, *where)
            if key not in _DIRECT_MATCHES:
                _DIRECT_MATCHES[key] = self._probe_direct(current_state)
            self._direct[where] = _DIRECT_MATCHES[key]
        return self._direct[where]

    def _probe_direct(self, like: torch.Tensor) -> bool:
        if sorted(self.params) != sorted(DIRECT_PARAMS) or self._act_fn is None:
            return False
        generator = torch.Generator().manual_seed(0)
        weights = self._random_weights(generator, like.device)
        hidden = self._shapes["gate_up_proj"][-1]
        # A decode row and a prefill's few; then rows 30x larger, whose activations (about 50) pass the limits a
        # forward may clamp them to (gpt-oss: 7), which values near 1 would never reach.
        for rows, scale in ((1, 1.0), (3, 1.0), (3, 30.0)):
            state = (scale * torch.randn(rows, hidden, generator=generator)).to(like.dtype).to(like.device)
            routing = torch.rand(rows, 1, generator=generator).to(like.dtype).to(like.device)
            try:
                got = direct_expert(self._act_fn, weights, state, routing)
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                log.info("%s: eager per-expert forward (the direct expert failed: %s)", self._cls.__name__, exc)
                return False
            expected = self.eager_expert(weights, state, routing)
            if got.shape != expected.shape or got.dtype != expected.dtype or not torch.equal(got, expected):
                log.info("%s: eager per-expert forward (the direct expert differs)", self._cls.__name__)
                return False
        return True

    def layer(
        self, fetched: Iterator[tuple[int, ExpertWeights]], convert: bool, hidden_states: torch.Tensor, *args, **kwargs
    ) -> torch.Tensor:
        """A whole layer's experts in one call of the eager forward, with the arguments the MoE block passed: each
        stacked parameter is a table whose `[expert]` is that expert's weights, pulled from `fetched` when the
        forward first asks for it (`convert`: dequantize them as `weights` does)."""
        pulled = _Pulled(fetched, self.weights if convert else dict)
        proxy = self._proxy({name: _ExpertTable(pulled, name) for name in self.params})
        out = self._forward(proxy, hidden_states, *args, **kwargs)
        pulled.drain()
        return out

    def layer_matches(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> bool:
        """Whether `layer` gives this class's forward the bits of the per-expert path, checked once per `_probe_key`
        on one row of a real call with random weights: False where the forward uses its stacked parameters other than
        by indexing them with one expert."""
        if self._whole is None:
            if self._probe_key not in _LAYER_MATCHES:
                _LAYER_MATCHES[self._probe_key] = self._probe(hidden_states[:1], top_k_index[:1], top_k_weights[:1])
            self._whole = _LAYER_MATCHES[self._probe_key]
        return self._whole

    def _random_weights(self, generator: torch.Generator, device: torch.device) -> ExpertWeights:
        """One expert's weights for a probe: small random values, in the compute dtype, on `device`."""
        return {
            n: (0.05 * torch.randn(shape, generator=generator)).to(self.dtype).to(device)
            for n, shape in self._shapes.items()
        }

    def _probe(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> bool:
        generator = torch.Generator().manual_seed(0)
        experts = sorted(set(top_k_index.reshape(-1).tolist()) - {self.num_experts})
        weights = {e: self._random_weights(generator, hidden_states.device) for e in experts}
        expected = sum_experts(
            self, hidden_states, top_k_index, top_k_weights, ((e, weights[e]) for e in experts), {}, experts
        )
        try:
            got = self.layer(((e, weights[e]) for e in experts), False, hidden_states, top_k_index, top_k_weights)
        except Exception as exc:  # any failure means: this forward needs the per-expert path
            log.info("%s: per-expert path (one forward over the layer failed: %s)", self._cls.__name__, exc)
            return False
        return bool(torch.equal(got, expected))


DIRECT_PARAMS = ("gate_up_proj", "down_proj")
"""The parameters of the gated expert `direct_expert` computes (a class with others, biases included, never uses it)."""
_DIRECT_MATCHES: dict[tuple, bool] = {}
"""`ExpertMath._probe_key`s (with dtype and device) whose one expert `direct_expert` computes."""


def direct_expert(
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    weights: ExpertWeights,
    current_state: torch.Tensor,
    routing_weights: torch.Tensor,
) -> torch.Tensor:
    """One gated expert's weighted output rows: the operations of the common eager forward for one expert (gate and up
    from one product, act(gate) * up, the down product, times the routing weights), without its routing bookkeeping."""
    gate, up = F.linear(current_state, weights["gate_up_proj"]).chunk(2, dim=-1)
    out = F.linear(act_fn(gate) * up, weights["down_proj"])
    return (out * routing_weights).to(current_state.dtype)


_LAYER_MATCHES: dict[tuple, bool] = {}
"""`ExpertMath._probe_key`s whose forward `ExpertMath.layer` may run, decided once per process."""


class _Pulled:
    """A layer's expert weights as the forward asks for them: each pulled from the source's fetch (waiting for
    it, and keeping what arrives before it) the first time, then kept to the end of the layer."""

    def __init__(self, fetched: Iterator[tuple[int, ExpertWeights]], convert: Callable[[ExpertWeights], ExpertWeights]):
        self._fetched, self._convert = fetched, convert
        self._arrived: dict[int, ExpertWeights] = {}
        self._ready: dict[int, ExpertWeights] = {}

    def get(self, expert: int) -> ExpertWeights:
        if expert not in self._ready:
            while expert not in self._arrived:
                got, weights = next(self._fetched)
                self._arrived[got] = weights
            self._ready[expert] = self._convert(self._arrived.pop(expert))
        return self._ready[expert]

    def drain(self) -> None:
        """Run the fetch to its end (its accounting), once the forward is done."""
        for _ in self._fetched:
            pass


class _ExpertTable:
    """Stands in for a stacked [experts, ...] parameter: `table[e]` is expert e's tensor."""

    def __init__(self, pulled: _Pulled, name: str) -> None:
        self._pulled, self._name = pulled, name

    def __getitem__(self, expert: torch.Tensor | int) -> torch.Tensor:
        return self._pulled.get(int(expert))[self._name]


def expert_forward(
    math: ExpertMath, weights: ExpertWeights, current_state: torch.Tensor, routing_weights: torch.Tensor
) -> torch.Tensor:
    """One expert's weighted output rows ([rows, 1] routing weights), op for op as the model's eager forward."""
    return math(weights, current_state, routing_weights)


class OffloadedExperts(nn.Module):
    def __init__(
        self,
        layer: int,
        num_experts: int,
        math: ExpertMath,
        cache: ExpertSource,
        ctx: StepContext,
        sink: RoutingSink | None = None,
    ) -> None:
        super().__init__()
        self.layer, self.num_experts, self.math = layer, num_experts, math
        self.cache, self.ctx, self.sink = cache, ctx, sink
        self.hooks: LayerHooks | None = None

    def forward(self, hidden_states: torch.Tensor, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        # The MoE block calls its experts as it calls the original class (positional or by that class's names).
        bound = self.math.signature.bind(None, hidden_states, *args, **kwargs).arguments
        top_k_index, top_k_weights = (bound[name] for name in list(self.math.signature.parameters)[2:4])
        routing = Routing(top_k_index, top_k_weights)
        if self.hooks is not None:
            routing = self.hooks.before_experts(self, hidden_states, routing)
        if self.sink is not None:
            self.sink.record(self.ctx, self.layer, routing.top_k_index, routing.top_k_weights)
        experts = sorted(set(routing.top_k_index.reshape(-1).tolist()) - {self.num_experts})
        fetched = self.cache.fetch(self.layer, experts, self.ctx.now, self.ctx.phase)
        whole_layer = (
            routing.top_k_index is top_k_index
            and routing.top_k_weights is top_k_weights
            and not routing.precomputed
            and hidden_states.device.type == "cpu"
            and self.cache.ready(self.layer, experts)
            and self.math.layer_matches(hidden_states, top_k_index, top_k_weights)
        )
        if whole_layer:
            out = self.math.layer(fetched, True, hidden_states, *args, **kwargs)
        else:
            out = sum_experts(
                self.math,
                hidden_states,
                routing.top_k_index,
                routing.top_k_weights,
                fetched,
                routing.precomputed,
                experts,
            )
        if self.hooks is not None:
            self.hooks.after_experts(self)
        return out


def sum_experts(
    math: ExpertMath,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    fetched: Iterable[tuple[int, ExpertWeights]],
    precomputed: dict[int, Contribution],
    experts: list[int],
) -> torch.Tensor:
    """The per-expert path: each fetched expert's rows through the eager forward as its weights arrive (but those
    in `precomputed`), then the outputs of `experts` summed in ascending order, as the eager forward sums them."""
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=math.num_experts + 1).permute(2, 1, 0)
    contributions: dict[int, Contribution] = dict(precomputed)
    for expert, weights in fetched:
        if expert in contributions:
            continue  # computed early by the strategy; the fetch still counts the access
        top_k_pos, token_idx = torch.where(expert_mask[expert])
        current_state = hidden_states[token_idx]
        out = expert_forward(math, weights, current_state, top_k_weights[token_idx, top_k_pos, None])
        contributions[expert] = (token_idx, out)
    for expert in experts:
        token_idx, current_hidden_states = contributions[expert]
        # The eager forward's index_add_, as index_put_ with accumulation: bit-identical sums (one expert's
        # token indices are distinct), but index_add_ on CPU enters an OpenMP region per call: at one decode
        # row it took more CPU than the expert's matrix products on a busy 2-core machine (engine_overhead).
        final_hidden_states.index_put_((token_idx,), current_hidden_states.to(final_hidden_states.dtype), True)
    return final_hidden_states
