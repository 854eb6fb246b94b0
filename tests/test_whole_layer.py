"""A layer whose experts are all in memory runs as one call of the model's own experts forward (ExpertMath.layer);
tokens stay those of the resident model, on that path, on the per-expert path (where a gated expert is computed
directly once a probe found the eager forward's bits) and at one decode thread."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.models.loader import reference_model
from harness.models.packer import pack_paths
from harness.runtime import offloaded
from harness.runtime.engine import OffloadEngine
from harness.runtime.generation import generate
from harness.runtime.offloaded import ExpertMath
from harness.store.layout import PackIndex

PROMPT = [5, 17, 99, 3, 250, 7, 8, 100, 42, 11]
NEW_TOKENS = 10


def _engine(model_dir, slots: int):
    paths = pack_paths(model_dir)
    index = PackIndex.load(paths["index"])
    engine = OffloadEngine(model_dir, index, paths["experts"], paths["dense"])
    engine.configure_cache(slots, "per-layer", "lru", seed=0, io_threads=2)
    return engine, index


@pytest.mark.parametrize("arch", ["olmoe", "mixtral"])
@pytest.mark.parametrize("decode_threads", [None, 1])
def test_whole_layer_path_keeps_tokens(arch, decode_threads, tiny_model, monkeypatch):
    model_dir = tiny_model(arch)
    index = PackIndex.load(pack_paths(model_dir)["index"])
    reference = generate(reference_model(model_dir, index), PROMPT, NEW_TOKENS, "greedy").token_ids
    calls = {"layer": 0}
    layer = ExpertMath.layer

    def counted(self, *args, **kwargs):
        calls["layer"] += 1
        return layer(self, *args, **kwargs)

    monkeypatch.setattr(ExpertMath, "layer", counted)
    threads = torch.get_num_threads()
    # Every expert fits: after the first reads, whole layers; at top-k slots, misses every step: per expert.
    for slots, whole in ((index.num_experts, True), (index.top_k, False)):
        calls["layer"] = 0
        engine, _ = _engine(model_dir, slots)
        try:
            tokens = generate(engine.model, PROMPT, NEW_TOKENS, "greedy", ctx=engine.ctx, decode_threads=decode_threads)
        finally:
            engine.close()
        assert tokens.token_ids == reference, f"{arch} with {slots} slots, decode threads {decode_threads}"
        assert torch.get_num_threads() == threads
        if whole:
            # Each MoE layer of each decode step once every expert it routes to has been read.
            assert calls["layer"] > 0


class _Indexed(nn.Module):
    """Experts whose forward only indexes its stacked parameters (as transformers' eager experts do)."""

    def __init__(self, experts: int = 4, hidden: int = 8, inter: int = 4) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.zeros(experts, hidden, inter))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final = torch.zeros_like(hidden_states)
        for expert in sorted(set(top_k_index.reshape(-1).tolist())):
            pos, rows = torch.where(torch.eq(top_k_index.T, expert))
            final.index_add_(0, rows, self.expert(hidden_states[rows], expert) * top_k_weights[rows, pos, None])
        return final

    def expert(self, rows: torch.Tensor, expert: int) -> torch.Tensor:
        gate, up = nn.functional.linear(rows, self.gate_up_proj[expert]).chunk(2, dim=-1)
        return nn.functional.linear(nn.functional.silu(gate) * up, self.down_proj[expert])


class _Whole(_Indexed):
    """Experts whose forward uses a stacked parameter as a whole: the one-call path must refuse it."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        scale = self.gate_up_proj.abs().amax()
        return super().forward(hidden_states, top_k_index, top_k_weights) * scale


@pytest.mark.parametrize(("cls", "expected"), [(_Indexed, True), (_Whole, False)])
def test_probe_accepts_only_indexing_forwards(cls, expected):
    math = ExpertMath(cls(), ["gate_up_proj", "down_proj"], None, torch.float32)
    hidden = torch.randn(3, 8)
    index = torch.tensor([[0, 2], [1, 2], [3, 0]])
    weights = torch.rand(3, 2)
    assert math.layer_matches(hidden, index, weights) is expected


class _Gated(_Indexed):
    """The common gated expert, its activation an attribute: one expert may be computed directly."""

    def __init__(self) -> None:
        super().__init__()
        self.act_fn = nn.SiLU()

    def expert(self, rows: torch.Tensor, expert: int) -> torch.Tensor:
        gate, up = nn.functional.linear(rows, self.gate_up_proj[expert]).chunk(2, dim=-1)
        return nn.functional.linear(self.act_fn(gate) * up, self.down_proj[expert])


class _UpFirst(_Gated):
    """Up before gate in the fused product (as some checkpoints lay it out): the direct expert's bits differ."""

    def expert(self, rows: torch.Tensor, expert: int) -> torch.Tensor:
        up, gate = nn.functional.linear(rows, self.gate_up_proj[expert]).chunk(2, dim=-1)
        return nn.functional.linear(self.act_fn(gate) * up, self.down_proj[expert])


class _Clamped(_Gated):
    """Gate and up clamped to a limit in the forward (as gpt-oss's are): rows near 1 never reach it, the probe's
    large rows do."""

    def expert(self, rows: torch.Tensor, expert: int) -> torch.Tensor:
        gate, up = nn.functional.linear(rows, self.gate_up_proj[expert]).chunk(2, dim=-1)
        return nn.functional.linear(self.act_fn(gate.clamp(max=7.0)) * up.clamp(-7.0, 7.0), self.down_proj[expert])


class _Flagged(_Gated):
    """Clamped or not by a flag its forward reads: two instances of one class, each its own probe."""

    def __init__(self, limit: bool) -> None:
        super().__init__()
        self.limit = limit

    def expert(self, rows: torch.Tensor, expert: int) -> torch.Tensor:
        return _Clamped.expert(self, rows, expert) if self.limit else super().expert(rows, expert)


def test_each_setting_of_a_class_has_its_own_probe():
    rows = torch.randn(2, 8)
    free = ExpertMath(_Flagged(limit=False), ["gate_up_proj", "down_proj"], None, torch.float32)
    limited = ExpertMath(_Flagged(limit=True), ["gate_up_proj", "down_proj"], None, torch.float32)
    assert free.direct_matches(rows) and not limited.direct_matches(rows)


@pytest.mark.parametrize(("cls", "expected"), [(_Gated, True), (_UpFirst, False), (_Indexed, False), (_Clamped, False)])
def test_direct_expert_only_where_it_gives_the_eager_bits(cls, expected):
    """The direct expert serves a class only where a probe found its bits; `_Indexed` has no `act_fn` to take."""
    math = ExpertMath(cls(), ["gate_up_proj", "down_proj"], None, torch.float32)
    rows = torch.randn(2, 8)
    assert math.direct_matches(rows) is expected
    weights = {"gate_up_proj": torch.randn(8, 8), "down_proj": torch.randn(8, 4)}
    routing = torch.rand(2, 1)
    rows = 30 * rows  # past the clamp
    # Either way an expert's output is the eager forward's, bit for bit.
    assert torch.equal(math(weights, rows, routing), math.eager_expert(weights, rows, routing))


@pytest.mark.parametrize("arch", ["olmoe", "mixtral"])
def test_the_per_expert_path_computes_experts_directly_and_keeps_tokens(arch, tiny_model, monkeypatch):
    model_dir = tiny_model(arch)
    index = PackIndex.load(pack_paths(model_dir)["index"])
    reference = generate(reference_model(model_dir, index), PROMPT, NEW_TOKENS, "greedy").token_ids
    calls = {"direct": 0}
    direct = offloaded.direct_expert

    def counted(*args, **kwargs):
        calls["direct"] += 1
        return direct(*args, **kwargs)

    monkeypatch.setattr(offloaded, "direct_expert", counted)
    engine, _ = _engine(model_dir, index.top_k)  # misses every step: the per-expert path
    try:
        tokens = generate(engine.model, PROMPT, NEW_TOKENS, "greedy", ctx=engine.ctx)
    finally:
        engine.close()
    assert tokens.token_ids == reference
    assert calls["direct"] > 0
