"""The vocabulary every layer shares: the cache unit, the phases of generation and the eviction scopes.

A leaf module (imports nothing of the harness) so that the store, the cache, the runtime and the trace
packages can all name an expert without importing one another.
"""

from __future__ import annotations

from typing import Literal

ExpertKey = tuple[int, int]
"""(layer, expert): the cache unit, one expert's weights in one MoE layer (model layer numbering)."""

Phase = Literal["prefill", "decode"]
PHASES: tuple[Phase, ...] = ("prefill", "decode")

Scope = Literal["per-layer", "global"]
"""Eviction group: one cache per MoE layer, or one cache over all layers."""
