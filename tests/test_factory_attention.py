"""The factory's routing-realism fix (ROUTING.md) reaches each architecture's own attention tensors: q/k norm
gains where the attention has them, else the query / key projections, and in fused projections only the
query or key rows; a sparse-attention indexer's norm is not the attention's. Routers that transformers
initialises to zero get a random init."""

from __future__ import annotations

import math

import pytest
import torch

from harness.models.factory import (
    ATTENTION_GAIN,
    INIT_STD,
    _config,
    _init_zero_routers,
    _model_class,
    _sharpen_attention,
    preset_for,
)

MLA = {"self_attn.q_b_proj.weight", "self_attn.kv_b_proj.weight"}


def _sharpened(arch: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    config = _config(arch, preset_for(arch, "tiny"), seed=0)
    torch.manual_seed(0)
    model = _model_class(config).from_config(config, dtype=torch.float32)
    before = {name: param.clone() for name, param in model.named_parameters()}
    _sharpen_attention(model)
    return model, before


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("qwen3_moe", {"self_attn.q_norm.weight", "self_attn.k_norm.weight"}),
        ("mixtral", {"self_attn.q_proj.weight", "self_attn.k_proj.weight"}),
        ("deepseek_v3", MLA),
        ("deepseek_v32", MLA),  # its indexer.k_norm is no q/k norm of the attention
        ("glm_moe_dsa", MLA),
        ("axk2", {"self_attn.q_gate_proj.weight", "self_attn.kv_b_proj.weight"}),
    ],
)
def test_gain_reaches_the_attention(arch, expected):
    model, before = _sharpened(arch)
    changed = {n.split(".", 3)[3] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == expected


def test_fused_query_gate_projection_scales_query_rows_only():
    # A.X K2: per head, qk_nope + qk_rope query rows, then v_head_dim output-gate rows.
    model, before = _sharpened("axk2")
    text = model.config
    query = text.qk_nope_head_dim + text.qk_rope_head_dim
    name = "model.layers.0.self_attn.q_gate_proj.weight"
    param = dict(model.named_parameters())[name]
    scale = ATTENTION_GAIN / (INIT_STD * math.sqrt(param.shape[-1]))
    after = param.view(text.num_attention_heads, query + text.v_head_dim, -1)
    old = before[name].view_as(after)
    assert torch.equal(after[:, :query], old[:, :query] * scale)
    assert torch.equal(after[:, query:], old[:, query:])


def test_zero_initialised_router_gets_a_random_init():
    # AFMoE's router starts at zero: every expert would tie for every token.
    config = _config("afmoe", preset_for("afmoe", "tiny"), seed=0)
    model = _model_class(config).from_config(config, dtype=torch.float32)
    routers = {n: p for n, p in model.named_parameters() if n.endswith("mlp.router.gate.weight")}
    assert routers and not any(p.any() for p in routers.values())
    others = {n: p.clone() for n, p in model.named_parameters() if n not in routers}
    _init_zero_routers(model)
    assert all(p.all() for p in routers.values())
    assert all(torch.equal(p, others[n]) for n, p in model.named_parameters() if n in others)
