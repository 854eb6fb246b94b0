"""LRFU with admission (`lrfu-admit`, `lrfu-admit:LAMBDA`): admission alone, the simplest of the policies
tried for the held-out goal (the others: `lrfu-prior`, and `reuse-logit`, the goal policy).

Eviction is LRFU's (`harness.cache.policies.lrfu`, same lambda default): the candidate with the smallest
combined recency-frequency value (CRF, lifetime, kept after eviction) leaves. The addition is admission, in
the spirit of TinyLFU (Einziger et al., 2017) and of Belady's bypass variant: a miss is inserted only when
its own CRF, which already counts the current access, is at least the would-be victim's; otherwise it
streams through a scratch slot and the resident expert stays. In a cache of a quarter of a layer's experts
with near-uniform routing, forced admission lets one-off experts push out the ones that keep coming back;
the admission test keeps them out. It reads nothing from the future or from a training part, so it runs
live as well as in replay.
"""

from __future__ import annotations

import numpy as np

from harness.cache.compiled import ADMIT_SIG, NONE, CompiledAdmission, Kernel, ranks_below
from harness.cache.jit import KERNEL, njit
from harness.cache.policies.lrfu import LAST, LRFU, LRFU_KERNEL, SCORE, lrfu_victim
from harness.cache.registry import register_policy


@njit(ADMIT_SIG, **KERNEL)
def _admit(
    g: np.ndarray,
    gf: np.ndarray,
    ki: np.ndarray,
    kf: np.ndarray,
    resident: np.ndarray,
    mark: np.ndarray,
    tag: int,
    incoming: int,
    now: int,
) -> int:
    # The same ranking as the victim's, ties included: the incoming key was used at `now`, so on equal CRF it
    # ranks above every candidate (used before `now`) and is admitted.
    victim = lrfu_victim(g, gf, ki, kf, resident, mark, tag, incoming, now)
    return victim if ranks_below(kf, ki, victim, incoming, SCORE, LAST) else NONE  # smaller (CRF, last use, key)


@register_policy
class AdmittingLRFU(CompiledAdmission, LRFU):
    name = "lrfu-admit"
    kernel = Kernel(
        access=LRFU_KERNEL.access, insert=LRFU_KERNEL.insert, evict=LRFU_KERNEL.evict, victim=lrfu_victim, admit=_admit
    )

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "admission": "incoming CRF >= victim CRF"}
