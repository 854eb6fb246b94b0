"""How many expert slots a VRAM budget gives the device tier (`--vram-budget`), decided before any weight loads.

    slots per eviction group = (budget - non-expert weights on the device - reserve) // (expert stride * groups)

The reserve is the device memory that is neither weights nor expert slots: `DEVICE_WORKSPACE_BYTES` (the CUDA
context's share the allocator sees, cuBLAS workspaces, activations of a prefill and allocator slack) plus the
run's KV cache at its longest sequence, which the caller computes from the model config. Pure arithmetic, no
torch: the tiers engine sizes its device tier with `device_tier_slots`, and the CPU tests check it by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from harness.errors import HarnessError

DEVICE_WORKSPACE_BYTES = 512 << 20
"""Device memory kept free of expert slots for activations, library workspaces and allocator slack (bytes).
A documented default, not measured: the run records it (`resolved.device_tier`) beside NVML's used memory in the
timeline (`gpu_mem_used_bytes`), so it can be checked against what the device really held."""


@dataclass(frozen=True)
class DeviceTier:
    """The device tier a VRAM budget allows: slots per eviction group and how they were derived."""

    slots: int
    """Expert slots per eviction group (a layer for per-layer scope, the model for global)."""
    budget_bytes: int
    dense_bytes: int
    reserve_bytes: int
    stride_bytes: int
    groups: int

    @property
    def how(self) -> str:
        return (
            f"vram_budget {self.budget_bytes} B - non-expert weights {self.dense_bytes} B - reserve "
            f"{self.reserve_bytes} B, over {self.groups} group(s) of {self.stride_bytes} B slots"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "slots": self.slots,
            "slots_total": self.slots * self.groups,
            "how": self.how,
            "vram_budget_bytes": self.budget_bytes,
            "dense_bytes": self.dense_bytes,
            "reserve_bytes": self.reserve_bytes,
            "workspace_bytes": DEVICE_WORKSPACE_BYTES,
        }


def device_tier_slots(
    budget_bytes: int,
    dense_bytes: int,
    stride_bytes: int,
    top_k: int,
    groups: int = 1,
    reserve_bytes: int = DEVICE_WORKSPACE_BYTES,
    maximum: int | None = None,
    budget_text: str | None = None,
) -> DeviceTier:
    """The device tier of a VRAM budget: `groups` eviction groups (the MoE layers for per-layer scope, 1 for
    global) of expert slots `stride_bytes` each, after the non-expert weights and `reserve_bytes`; at most
    `maximum` slots per group (every expert of a group). A budget that leaves fewer than `top_k` slots per group
    (one layer's experts of one step) is a one-line HarnessError naming the figures and the least budget."""
    if stride_bytes <= 0 or groups <= 0 or top_k <= 0:
        raise ValueError("stride_bytes, groups and top_k must be positive")
    free = budget_bytes - dense_bytes - reserve_bytes
    slots = max(free, 0) // (stride_bytes * groups)
    if slots < top_k:
        need = dense_bytes + reserve_bytes + top_k * groups * stride_bytes
        raise HarnessError(
            f"VRAM budget {budget_text or budget_bytes} is too small: the non-expert weights take "
            f"{dense_bytes / 2**20:.0f} MiB, the reserve (activations, KV cache, workspace) "
            f"{reserve_bytes / 2**20:.0f} MiB, and one layer's top-{top_k} experts in each of {groups} eviction "
            f"group(s) {top_k * groups * stride_bytes / 2**20:.0f} MiB; use at least {math.ceil(need / 2**20)}MiB"
        )
    if maximum is not None:
        slots = min(slots, maximum)
    return DeviceTier(slots, budget_bytes, dense_bytes, reserve_bytes, stride_bytes, groups)
