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
)
"""model_type values with a factory configuration and a greedy-token equivalence test."""

REFUSED: dict[str, str] = {}
"""model_type -> what the harness lacks to run it offloaded (also in the README)."""
