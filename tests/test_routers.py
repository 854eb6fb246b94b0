"""Routers found in the model's own MoE blocks: on the same hidden state they select exactly the experts (and
weights) the block itself passes to its experts, for every supported architecture; prediction strategies
then run on architectures whose router is not a `gate` (gpt-oss) or is group-limited (DeepSeek-V3)."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoConfig
from transformers.models.dbrx.modeling_dbrx import DbrxFFN

from harness.errors import HarnessError
from harness.models.adapters import decoder_layers, eager_forward, experts_sites
from harness.models.loader import reference_model
from harness.models.packer import pack_paths
from harness.models.routers import TOKEN_IDS, StepTokens, layer_routers, router_of
from harness.runtime.generation import generate
from harness.runtime.strategies.base import CollapsedThenNormed, moe_input_norm
from harness.store.layout import PackIndex
from tests.conftest import ARCHS
from tests.test_strategies import NEW_TOKENS, PROMPT, strategy_tokens

TOKENS = 7


def block_routing(
    block: nn.Module, experts: nn.Module, hidden: torch.Tensor, **kwargs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k ids, top-k weights) the block passes to its experts for `hidden` [1, T, H] and `kwargs` (the token
    ids of a block that routes by them), hooked, not recomputed."""
    seen = {}
    names = list(inspect.signature(eager_forward(experts)).parameters)[1:4]

    def hook(_: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = dict(zip(names, args, strict=False)) | kwargs
        seen["ids"], seen["weights"] = bound[names[1]], bound[names[2]]

    handle = experts.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            block(hidden, **kwargs)
    finally:
        handle.remove()
    return seen["ids"], seen["weights"]


def assert_same_selection(ours: tuple, theirs: tuple) -> None:
    """Same experts with the same weights per token (top-k order may differ: some routers use sorted=False)."""
    (ids, weights), (ids2, weights2) = ours, theirs
    order, order2 = ids.argsort(dim=-1), ids2.argsort(dim=-1)
    assert torch.equal(ids.gather(-1, order), ids2.reshape(ids.shape).gather(-1, order2.reshape(ids.shape)))
    assert torch.equal(weights.gather(-1, order), weights2.reshape(ids.shape).gather(-1, order2.reshape(ids.shape)))


@pytest.mark.parametrize("arch", ARCHS)
def test_router_selects_what_the_block_selects(arch, tiny_model):
    model = reference_model(tiny_model(arch))
    torch.manual_seed(0)
    tokens = StepTokens(model)
    tokens.ids = torch.randint(model.config.get_text_config().vocab_size, (1, TOKENS))
    for site in experts_sites(model).values():
        router = router_of(site.parent, site.module, site.num_experts, tokens)
        hidden_size = router.hidden
        hidden = torch.randn(1, TOKENS, hidden_size, dtype=next(site.module.parameters()).dtype)
        with torch.no_grad():
            logits, weights, ids = router(hidden[0])
        assert logits.shape == (TOKENS, site.num_experts)
        by_id = {TOKEN_IDS: tokens.ids} if router.by_token_id else {}
        assert_same_selection((ids, weights), block_routing(site.parent, site.module, hidden, **by_id))


def test_hash_routed_layers_are_predicted_from_the_token_ids(tiny_model):
    """DeepSeek-V4's first MoE layer routes by a frozen token id -> experts table (filled at random by the factory:
    k distinct experts per id): the router picks exactly the table's row of each token of the current pass."""
    model = reference_model(tiny_model("deepseek_v4"))
    routers = layer_routers(model, {layer: site.module for layer, site in experts_sites(model).items()}, 8)
    hashed = [layer for layer, router in routers.items() if router.by_token_id]
    assert len(hashed) == 1 and len(routers) == 2  # the tiny preset: one hash-routed layer, one learned
    table = routers[hashed[0]].module.tid2eid
    assert all(len(set(row.tolist())) == table.shape[1] for row in table)  # distinct experts per token id
    prompt = torch.tensor([PROMPT])
    seen = {}
    routers[hashed[0]].block.register_forward_pre_hook(lambda _, args: seen.__setitem__("hidden", args[0]))
    with torch.no_grad():
        model(prompt)
        _, _, ids = routers[hashed[0]](seen["hidden"])
    assert torch.equal(ids, table[prompt[0]])
    with pytest.raises(HarnessError, match="applied to 3 token"):
        routers[hashed[0]](seen["hidden"][:, :3])


def test_logits_only_router_is_completed_by_the_block():
    """DBRX's router returns logits only; the block's route_tokens_to_experts makes the top-k."""
    config = AutoConfig.for_model(
        "dbrx", d_model=32, ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 6, "moe_top_k": 2}
    )
    torch.manual_seed(0)
    block = DbrxFFN(config)
    for p in block.parameters():
        nn.init.normal_(p)
    router = router_of(block, block.experts, 6)
    hidden = torch.randn(1, TOKENS, 32)
    with torch.no_grad():
        _, weights, ids = router(hidden[0])
    assert_same_selection((ids, weights), block_routing(block, block.experts, hidden))


def test_router_that_needs_what_the_block_lacks_is_refused():
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 8))

        def forward(self, hidden_states: torch.Tensor, token_types: torch.Tensor) -> tuple:
            raise AssertionError("never called")

    block = nn.Module()
    block.gate, block.experts = Gate(), nn.Linear(1, 1)
    with pytest.raises(HarnessError, match="needs 'token_types', which its MoE block Module does not hold"):
        router_of(block, block.experts, 4)
    block = nn.Module()
    block.mlp, block.experts = nn.Linear(8, 3), nn.Linear(1, 1)
    with pytest.raises(HarnessError, match=r"holds no router \(a child with a \[4, hidden\] weight\)"):
        router_of(block, block.experts, 4)


@pytest.mark.parametrize("arch", ["gpt_oss", "deepseek_v3", "lfm2_moe", "afmoe", "deepseek_v4", "hy_v4", "qwen3_5_moe"])
def test_prediction_strategies_match_resident_model(arch, tiny_model):
    model_dir = tiny_model(arch)
    reference = generate(reference_model(model_dir), PROMPT, NEW_TOKENS, "greedy").token_ids
    index = PackIndex.load(pack_paths(model_dir)["index"])
    layers = len(index.moe_layers)
    # Predictions per decode step: the look-ahead predicts every MoE layer, the next-layer gate all but the first.
    for spec, predictions in [("lookahead+gate", layers), ("prefetch", layers - 1), ("fiddler", None)]:
        tokens, strategy, _ = strategy_tokens(model_dir, spec, index.top_k)
        assert tokens == reference, f"{arch} {spec}"
        if predictions is not None:
            assert strategy.stats()["prediction"]["predictions"] == (NEW_TOKENS - 1) * predictions


@pytest.mark.parametrize("arch", ARCHS)
def test_moe_input_norm_is_the_norm_before_the_moe_block(arch, tiny_model):
    """The look-ahead's norm is the one whose output the MoE block reads (none in a post-norm layer)."""
    model = reference_model(tiny_model(arch))
    seen: dict[str, torch.Tensor] = {}
    layer, site = next(iter(experts_sites(model).items()))
    decoder = decoder_layers(model)[layer]
    norm = moe_input_norm(SimpleNamespace(model=model), layer)  # type: ignore[arg-type]
    norms = [m for m in decoder.children() if "norm" in type(m).__name__.lower()]
    handles = [site.parent.register_forward_pre_hook(lambda _, args: seen.__setitem__("moe", args[0]))]
    for i, child in enumerate(norms):
        handles.append(child.register_forward_hook(lambda m, _, out, i=i: seen.__setitem__(f"norm{i}", out)))
    with torch.no_grad():
        model(torch.tensor([PROMPT]))
    for handle in handles:
        handle.remove()
    matches = [norms[int(k[4:])] for k, v in seen.items() if k != "moe" and torch.equal(v, seen["moe"])]
    expected = norm.norm if isinstance(norm, CollapsedThenNormed) else norm
    assert matches == ([] if isinstance(expected, nn.Identity) else [expected])


@pytest.mark.parametrize("arch", ["deepseek_v4", "hy_v4"])
def test_moe_input_of_a_layer_with_hyper_connections_is_its_collapsed_residual_normed(arch, tiny_model):
    """With hyper-connections the residual stream is hc_mult streams; the look-ahead's input map collapses them
    as the layer's ffn_hc does and applies the pre-MoE norm: exactly the MoE block's input."""
    model = reference_model(tiny_model(arch))
    layer, site = next(iter(experts_sites(model).items()))
    decoder = decoder_layers(model)[layer]
    seen: dict[str, torch.Tensor] = {}
    decoder.ffn_hc.register_forward_pre_hook(lambda _, args: seen.__setitem__("streams", args[0]))
    site.parent.register_forward_pre_hook(lambda _, args: seen.__setitem__("moe", args[0]))
    with torch.no_grad():
        model(torch.tensor([PROMPT]))
        mapped = moe_input_norm(SimpleNamespace(model=model), layer)(seen["streams"])  # type: ignore[arg-type]
    assert seen["streams"].shape[-2] == model.config.hc_mult
    assert torch.equal(mapped, seen["moe"])
