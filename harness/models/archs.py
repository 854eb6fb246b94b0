"""Which transformers MoE architectures (config `model_type`) the harness runs offloaded, and which it refuses.

A plain table without imports, so the CLI can offer the list without loading torch. Adding an architecture
whose experts follow transformers' stacked layout is one entry here and one configuration in
`harness.models.factory.ARCHITECTURES`; tests/test_offload_equivalence.py then checks it.
"""

from __future__ import annotations

SUPPORTED: tuple[str, ...] = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "gpt_oss",
    "qwen3_next",
    "glm4_moe",
    "phimoe",
    "granitemoe",
    "ernie4_5_moe",
    "hunyuan_v1_moe",
    "dots1",
    "minimax",
    "lfm2_moe",
    "qwen3_5_moe",
    "afmoe",
    "axk2",
    "cohere2_moe",
    "glm4_moe_lite",
    "minimax_m2",
    "granitemoeshared",
    "flex_olmo",
    "exaone_moe",
    "solar_open",
    "glm_moe_dsa",
    "jamba",
    "deepseek_v32",
    "sarvam_moe",
    "hy_v3",
    "mellum",
    "laguna",
    "granitemoehybrid",
    "kimi_linear",
    "deepseek_v4",
    "hy_v4",
    "sarvam_mla",
    "granitemoe_swa",
    "kolibri1",
    "lara_mini",
    "axk1",
    "mimo_v2_flash",
)
"""model_type values with a factory configuration and a greedy-token equivalence test."""

_MULTIMODAL = (
    "a multimodal wrapper whose text model has no causal-LM class in transformers (AutoModelForCausalLM); "
    "loading its text model alone from the wrapper's checkpoint is not implemented"
)

REFUSED: dict[str, str] = {
    "llama4": "Llama4TextExperts.forward(hidden_states) takes no top-k expert index: every expert runs on every "
    "token, with the router scores applied to the input beforehand",
    "llama4_text": "Llama4TextExperts.forward(hidden_states) takes no top-k expert index: every expert runs on "
    "every token, with the router scores applied to the input beforehand",
    "jetmoe": "its experts (JetMoeParallelExperts, also in attention) are not one stacked `experts` module "
    "with a top-k forward",
    "longcat_flash": "zero-computation (identity) experts: its stacked expert tensors hold different expert counts",
    "dbrx": "its experts are not stacked per expert: each weight is one [experts x ffn_hidden_size, hidden] matrix "
    "in an `mlp` child (DbrxExpertGLU), which the packer does not split",
    "switch_transformers": "an encoder-decoder model, not a causal LM",
    "nllb-moe": "an encoder-decoder model, not a causal LM",
    "qwen3_vl_moe": _MULTIMODAL,
    "qwen3_omni_moe": _MULTIMODAL,
    "glm4v_moe": _MULTIMODAL,
    "ernie4_5_vl_moe": _MULTIMODAL,
    "deepseek_ocr2": _MULTIMODAL,
}
"""model_type -> what the harness lacks to run it offloaded (also in the README)."""
