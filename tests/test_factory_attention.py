"""The factory's routing-realism fix (ROUTING.md) reaches each architecture's own attention tensors: q/k norm
gains where the attention has them, else the query / key projections, and in fused projections only the
query or key rows; a sparse-attention indexer's norm is not the attention's. Routers that transformers
initialises to zero get a random init. The linear-attention counterpart reaches gated DeltaNet's and Kimi Delta
Attention's convolution, decay and q/k/gate projections, and nothing else."""

from __future__ import annotations

import math

import pytest
import torch

from harness.models.factory import (
    ATTENTION_GAIN,
    INIT_STD,
    LINEAR_KEEP,
    _config,
    _init_hash_routes,
    _init_zero_routers,
    _model_class,
    _sharpen_attention,
    _sharpen_linear_attention,
    preset_for,
)

MLA = {"self_attn.q_b_proj.weight", "self_attn.kv_b_proj.weight"}


def _tiny(arch: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The tiny preset's model of `arch` at its default init, and a copy of its parameters."""
    config = _config(arch, preset_for(arch, "tiny"), seed=0)
    torch.manual_seed(0)
    model = _model_class(config).from_config(config, dtype=torch.float32)
    return model, {name: param.clone() for name, param in model.named_parameters()}


def _changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    """The names, below `model.layers.N.`, of the parameters that differ from `before`."""
    return {n.split(".", 3)[3] for n, p in model.named_parameters() if not torch.equal(p, before[n])}


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
    model, before = _tiny(arch)
    _sharpen_attention(model)
    assert _changed(model, before) == expected


def test_fused_query_gate_projection_scales_query_rows_only():
    # A.X K2: per head, qk_nope + qk_rope query rows, then v_head_dim output-gate rows.
    model, before = _tiny("axk2")
    _sharpen_attention(model)
    text = model.config
    query = text.qk_nope_head_dim + text.qk_rope_head_dim
    name = "model.layers.0.self_attn.q_gate_proj.weight"
    param = dict(model.named_parameters())[name]
    scale = ATTENTION_GAIN / (INIT_STD * math.sqrt(param.shape[-1]))
    after = param.view(text.num_attention_heads, query + text.v_head_dim, -1)
    old = before[name].view_as(after)
    assert torch.equal(after[:, :query], old[:, :query] * scale)
    assert torch.equal(after[:, query:], old[:, query:])


def test_shared_key_value_attention_scales_its_key_value_norms_and_undoes_it_on_the_output():
    # DeepSeek-V4: the query's norm has no weight, the one key-value head is both key and value.
    model, before = _tiny("deepseek_v4")
    _sharpen_attention(model)
    square = ATTENTION_GAIN**2
    changed = {n.split(".", 3)[3] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"self_attn.kv_norm.weight", "self_attn.compressor.kv_norm.weight", "self_attn.o_b_proj.weight"}
    params = dict(model.named_parameters())
    for name, param in params.items():
        if name.endswith("self_attn.kv_norm.weight") or name.endswith("self_attn.compressor.kv_norm.weight"):
            assert torch.equal(param, before[name] * square)
        if name.endswith("o_b_proj.weight"):
            assert torch.equal(param, before[name] / square)


def test_hash_routed_layers_get_k_distinct_random_experts_per_token_id():
    model, _ = _tiny("deepseek_v4")
    tables = [m.tid2eid for m in model.modules() if hasattr(m, "tid2eid")]
    assert len(tables) == 1 and not tables[0].any()  # transformers leaves it zero: every token to expert 0
    torch.manual_seed(0)
    assert _init_hash_routes(model) == 1
    table = tables[0]
    experts = model.config.n_routed_experts
    assert table.shape == (model.config.vocab_size, model.config.num_experts_per_tok)
    assert all(len(set(row.tolist())) == table.shape[1] for row in table)
    assert int(table.min()) >= 0 and int(table.max()) < experts
    counts = torch.bincount(table.flatten(), minlength=experts)
    assert counts.min() > 0  # every expert serves some token ids


def test_zero_initialised_router_gets_a_random_init():
    # AFMoE's router starts at zero: every expert would tie for every token.
    model, before = _tiny("afmoe")
    routers = {n: p for n, p in model.named_parameters() if n.endswith("mlp.router.gate.weight")}
    assert routers and not any(p.any() for p in routers.values())
    _init_zero_routers(model)
    assert all(p.all() for p in routers.values())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n not in routers)


def _kept_per_token(a_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    # At a zero gate input the state decays by exp(-exp(A_log) * softplus(dt_bias)) per token; A_log is per head,
    # dt_bias per head (DeltaNet) or per channel (KDA): with A_log 0 the factor is 1 for every channel.
    assert not a_log.any()
    return torch.exp(-torch.nn.functional.softplus(dt_bias))


@pytest.mark.parametrize(
    "arch, prefix, expected, kind",
    [
        (
            "qwen3_next",
            "linear_attn.",
            {"conv1d.weight", "A_log", "dt_bias", "in_proj_qkvz.weight"},
            "gated_deltanet",
        ),
        (
            "kimi_linear",
            "self_attn.",
            {"conv1d.weight", "forget_gate.A_log", "forget_gate.dt_bias", "g_a_proj.weight", "g_b_proj.weight"},
            "kimi_delta",
        ),
    ],
)
def test_linear_attention_rule_reaches_its_tensors_and_sets_the_decay(arch, prefix, expected, kind):
    model, before = _tiny(arch)
    changed_layers = _sharpen_linear_attention(model)
    assert _changed(model, before) == {prefix + name for name in expected}
    assert changed_layers == len({n.split(".")[2] for n, p in model.named_parameters() if ".A_log" in n})
    params = dict(model.named_parameters())
    gate = "forget_gate." if kind == "kimi_delta" else ""
    for name in params:
        if name.endswith(gate + "A_log"):
            dt_bias = params[name.removesuffix("A_log") + "dt_bias"]
            kept = _kept_per_token(params[name], dt_bias)
            assert torch.allclose(kept, torch.full_like(kept, LINEAR_KEEP[kind]), atol=1e-6)


def test_gated_deltanet_value_rows_keep_their_init():
    # in_proj_qkvz, per key-head group: q and k rows (gain), then v rows (kept), then z rows (gain).
    model, before = _tiny("qwen3_next")
    _sharpen_linear_attention(model)
    layer = next(m for m in model.modules() if hasattr(m, "in_proj_qkvz"))
    name = next(n for n, p in model.named_parameters() if p is layer.in_proj_qkvz.weight)
    weight = layer.in_proj_qkvz.weight
    rows = weight.view(layer.num_k_heads, -1, weight.shape[-1])
    old = before[name].view_as(rows)
    scale = ATTENTION_GAIN / (INIT_STD * math.sqrt(weight.shape[-1]))
    qk, z = 2 * layer.head_k_dim, layer.value_dim // layer.num_k_heads
    assert torch.equal(rows[:, :qk], old[:, :qk] * scale)
    assert torch.equal(rows[:, qk:-z], old[:, qk:-z])
    assert torch.equal(rows[:, -z:], old[:, -z:] * scale)


def test_linear_attention_rule_leaves_other_architectures_alone():
    model, before = _tiny("qwen3_moe")
    assert _sharpen_linear_attention(model) == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
