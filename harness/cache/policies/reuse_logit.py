"""`reuse-logit`: a per-layer reuse predictor learned online, with admission: the held-out goal policy.

For each MoE layer, a logistic model estimates the probability that an expert is needed at the layer's next
token step from features of its history, and learns from every step (one SGD step on the logistic loss of
all experts of the layer seen so far, the step's experts being the positives). Eviction takes the candidate
with the lowest predicted reuse; admission streams a miss whose prediction is below the would-be victim's,
as in `lrfu-admit`. Features of expert e, from its accesses before the step:
- log-rates at five time scales: `log((CRF_lambda(e) + 0.5) / (N_lambda + 5))` for lambda in LAMBDAS, where
  CRF is LRFU's decayed count and N_lambda the decayed number of the layer's steps (0.5 / 5: a prior rate of
  0.1 for experts seen rarely);
- recency: 1 / (steps since the last use), 0 if never used;
- whether e was needed at each of the layer's last RECENT_STEPS steps (0 or 1 each);
- the log-rate of the expert in a frequency profile (`--split`'s training part, or `reuse-logit:TRACE`),
  clipped at 1e-3; 0 without a profile;
- a bias.
The weights start as "LRFU with lambda = 0.01" (weight 1 on that log-rate, 0 elsewhere). Where the profile
carries its steps (`FrequencyProfile.history`: a `--split` training part, a TRACE), a layer's model first
learns on the profile's steps of that layer (warm start, when the layer is first seen) and then starts its
history afresh with the weights it learned; nothing is fitted on the scored part beforehand, so what it
learns there it learns as a live run would.

"The experts of the layer seen so far" are experts 0 .. the largest id accessed or inserted in the layer.
A step is learned from lazily: when the layer's next step begins, or when a decision reads the layer's
predictions, whichever comes first (the same result either way: nothing in between changes its inputs).

Ties go to the less recent last use, then the smaller key. No future, no bytes: it runs live as in replay.

The decisions are compiled kernels (`harness.cache.compiled`): the live engine's hooks and the simulator's
compiled replay call the same functions. State: per layer a block of globals (`g`: step clocks, the number
of experts seen, the first and last rows of the layer's experts; `gf`: the weights and the decayed step
counts); per key a row (its layer's block, the next expert's row, last use, pending flag, recent-step
indicators; decayed counts, their log-rates, the prediction, the profile feature). Every expert below a
bound key's id gets a row too (`bind`), so a layer's experts form a list in id order for the SGD sweep.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import numpy as np

from harness.cache.compiled import (
    ACCESS_SIG,
    ADMIT_SIG,
    EXPERT,
    FIRST_COLUMN,
    KEY_SIG,
    NONE,
    STATE,
    VICTIM_SIG,
    CompiledAdmission,
    Kernel,
    ranks_below,
)
from harness.cache.jit import KERNEL, njit
from harness.cache.policies.static import load_profile
from harness.cache.profile import FrequencyProfile
from harness.cache.registry import register_policy
from harness.errors import HarnessError
from harness.keys import ExpertKey

try:
    from numba import types
except ImportError:  # njit is the identity (harness.cache.jit)
    types = None  # type: ignore[assignment]

LAMBDAS = np.array([0.0, 0.01, 0.03, 0.1, 0.3])
"""Decays per token step of the log-rate features (LRFU's lambda): lifetime counts to a few steps."""
RECENT_STEPS = 3
"""Indicator features: needed at the layer's previous step, the one before, and so on."""
START_LAMBDA_INDEX = 1
"""The feature whose weight starts at 1: LRFU's default lambda (0.01)."""
LEARNING_RATE = 0.1
"""SGD step on the mean logistic-loss gradient of a layer's experts, per token step."""
PRIOR_HITS, PRIOR_STEPS = 0.5, 5.0
PROFILE_FLOOR = 1e-3
_NEVER = -(1 << 40)  # last-use step of an expert never used: recency feature 1 / huge = 0
_UNSET = -(1 << 62)
"""A layer's pending or settled step where there is none."""

RATES = len(LAMBDAS)
FEATURES = 1 + RATES + 1 + RECENT_STEPS + 1
"""Bias, log-rates, recency, recent-step indicators, profile."""

# Key columns. Int: the layer's block, the row of the next expert of the layer (id order), the last use,
# whether the key is needed at the layer's pending step, the recent-step indicators (1: needed k+1 steps ago).
BLOCK, NEXT, LAST, PENDING, RECENT = range(FIRST_COLUMN, FIRST_COLUMN + 5)
# Float: decayed counts per lambda, their log-rates (as of the layer's decayed step counts), the predicted
# reuse logit (-inf until the first step learned after the key's expert joined the layer), the profile feature.
CRF, RATE, SCORE, PROFILE = 0, RATES, 2 * RATES, 2 * RATES + 1
# A layer's block: ints at g[BLOCK_INTS * b:], floats at gf[BLOCK_FLOATS * b:].
PENDING_NOW, SETTLED_NOW, SIZE, SCORED, FIRST_ROW, TOP_ROW, BOUND_TOP = range(7)
"""The step being accumulated, the last step learned from, the experts seen (and of them, those predicted at
the last step learned from), the rows of expert 0 and of expert SIZE - 1, and the row of the largest expert
id bound (where the next bound expert is linked)."""
BLOCK_INTS = 7
WEIGHTS, STEPS, GRADIENT, DECAYS = 0, FEATURES, FEATURES + RATES, 2 * FEATURES + RATES
"""A layer's floats: its weights, decayed step counts, and `settle`'s scratch (the gradient, the step's decays)."""
BLOCK_FLOATS = 2 * FEATURES + 2 * RATES

BLOCK_SIG: Any = types.none(*STATE, types.int64) if types is not None else None
LEARN_SIG: Any = types.none(*STATE, types.int64[:], types.int64[:]) if types is not None else None


@njit(**KERNEL, inline="always")
def _logit(gf: np.ndarray, weights: int, ki: np.ndarray, kf: np.ndarray, row: int, now: int) -> float:
    """The weights at gf[weights:] times the features of key `row` at step `now` (its log-rates as stored)."""
    z = gf[weights]
    for i in range(RATES):
        z += kf[row, RATE + i] * gf[weights + 1 + i]
    z += (1.0 / max(now - ki[row, LAST], 1)) * gf[weights + 1 + RATES]
    for k in range(RECENT_STEPS):
        z += ki[row, RECENT + k] * gf[weights + 2 + RATES + k]
    return z + kf[row, PROFILE] * gf[weights + FEATURES - 1]


@njit(BLOCK_SIG, **KERNEL, inline="always")
def settle(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, block: int) -> None:
    """Learn from the layer's pending step (its experts are the positives), then add it to the history and
    predict every expert's reuse at the next step. Inlined where it is called."""
    at, fat = BLOCK_INTS * block, BLOCK_FLOATS * block
    now = g[at + PENDING_NOW]
    if now == _UNSET:
        return
    size = g[at + SIZE]
    settled = g[at + SETTLED_NOW]
    # The prediction made at the last step learned from is this step's logit (same weights and features)
    # where this step is the next one; experts seen since have none.
    predicted = g[at + SCORED] if settled != _UNSET and now == settled + 1 else 0
    w, grad = fat + WEIGHTS, fat + GRADIENT
    for j in range(FEATURES):
        gf[grad + j] = 0.0
    row = g[at + FIRST_ROW]
    for e in range(size):
        z = kf[row, SCORE] if e < predicted else _logit(gf, w, ki, kf, row, now)
        err = ki[row, PENDING] - 1.0 / (1.0 + math.exp(-z))
        gf[grad] += err
        for i in range(RATES):
            gf[grad + 1 + i] += kf[row, RATE + i] * err
        gf[grad + 1 + RATES] += (1.0 / max(now - ki[row, LAST], 1)) * err
        for k in range(RECENT_STEPS):
            gf[grad + 2 + RATES + k] += ki[row, RECENT + k] * err
        gf[grad + FEATURES - 1] += kf[row, PROFILE] * err
        row = ki[row, NEXT]
    for j in range(FEATURES):
        gf[w + j] += LEARNING_RATE * gf[grad + j] / size
    steps = fat + STEPS
    for i in range(RATES):
        gf[fat + DECAYS + i] = np.exp2(-LAMBDAS[i] * (now - settled)) if settled != _UNSET else 1.0
        gf[steps + i] = gf[steps + i] * gf[fat + DECAYS + i] + 1.0
    row = g[at + FIRST_ROW]
    for _ in range(size):
        needed = ki[row, PENDING]
        for i in range(RATES):
            crf = kf[row, CRF + i] * gf[fat + DECAYS + i] + needed
            kf[row, CRF + i] = crf
            kf[row, RATE + i] = math.log((crf + PRIOR_HITS) / (gf[steps + i] + PRIOR_STEPS))
        if needed:
            ki[row, LAST] = now
        for k in range(RECENT_STEPS - 1, 0, -1):
            ki[row, RECENT + k] = ki[row, RECENT + k - 1]
        ki[row, RECENT] = needed
        ki[row, PENDING] = 0
        kf[row, SCORE] = _logit(gf, w, ki, kf, row, now + 1)
        row = ki[row, NEXT]
    g[at + SETTLED_NOW] = now
    g[at + SCORED] = size
    g[at + PENDING_NOW] = _UNSET


@njit(KEY_SIG, **KERNEL)
def _grow(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    """The key's expert and every smaller id join the layer's experts (never used, no prediction yet)."""
    at, fat = BLOCK_INTS * ki[key, BLOCK], BLOCK_FLOATS * ki[key, BLOCK]
    size = g[at + SIZE]
    if ki[key, EXPERT] < size:
        return
    row = g[at + TOP_ROW]
    for e in range(size, ki[key, EXPERT] + 1):
        row = g[at + FIRST_ROW] if e == 0 else ki[row, NEXT]
        for i in range(RATES):
            kf[row, RATE + i] = math.log((kf[row, CRF + i] + PRIOR_HITS) / (gf[fat + STEPS + i] + PRIOR_STEPS))
    g[at + TOP_ROW] = row
    g[at + SIZE] = ki[key, EXPERT] + 1


@njit(ACCESS_SIG, **KERNEL)
def _access(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int, hit: bool) -> None:
    at = BLOCK_INTS * ki[key, BLOCK]
    if g[at + PENDING_NOW] != now:
        settle(g, gf, ki, kf, ki[key, BLOCK])
    _grow(g, gf, ki, kf, key, now)
    ki[key, PENDING] = 1
    g[at + PENDING_NOW] = now


@njit(VICTIM_SIG, **KERNEL)
def _victim(
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
    """The candidate of lowest predicted reuse, each layer's pending step learned first."""
    settle(g, gf, ki, kf, ki[incoming, BLOCK])
    best = -1
    for key in resident:
        if key >= 0 and mark[key] != tag:
            if g[BLOCK_INTS * ki[key, BLOCK] + PENDING_NOW] != _UNSET:
                settle(g, gf, ki, kf, ki[key, BLOCK])
            if best < 0 or ranks_below(kf, ki, key, best, SCORE, LAST):
                best = key
    return best


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
) -> bool:
    """The miss goes in where its predicted reuse ranks above the would-be victim's."""
    return ranks_below(kf, ki, _victim(g, gf, ki, kf, resident, mark, tag, incoming, now), incoming, SCORE, LAST)


@njit(LEARN_SIG, **KERNEL)
def learn(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, rows: np.ndarray, bounds: np.ndarray) -> None:
    """Learn from steps of one layer in order, step i needing rows[bounds[i]:bounds[i + 1]] at now = i."""
    for i in range(len(bounds) - 1):
        for j in range(bounds[i], bounds[i + 1]):
            _access(g, gf, ki, kf, rows[j], i, True)
    if len(rows):
        settle(g, gf, ki, kf, ki[rows[0], BLOCK])


_WARM: OrderedDict[tuple[int, int], tuple[list[tuple[int, ...]], np.ndarray]] = OrderedDict()
_WARM_KEPT = 256
"""Warm-start weights kept per profile history of a layer (by identity: a profile's steps do not change once
built), so that the simulator's many books on one profile (capacities, per-layer groups) learn them once."""


def start_weights() -> np.ndarray:
    """Bias, log-rates, recency, recent-step indicators, profile: 1 on LRFU's lambda, 0 elsewhere."""
    weights = np.zeros(FEATURES)
    weights[1 + START_LAMBDA_INDEX] = 1.0
    return weights


@register_policy
class ReuseLogit(CompiledAdmission):
    name = "reuse-logit"
    profiled = True
    kernel = Kernel(access=_access, insert=_grow, victim=_victim, admit=_admit)
    int_columns = (NONE, NONE, _NEVER, 0) + (0,) * RECENT_STEPS
    float_columns = (0.0,) * (2 * RATES) + (-math.inf, 0.0)

    def __init__(self, capacity: int, seed: int = 0, profile: FrequencyProfile | None = None) -> None:
        self.profile = profile
        self.blocks: dict[int, int] = {}
        """Layer -> its block of globals, in first-seen order."""
        super().__init__(capacity, seed)

    @classmethod
    def from_spec(
        cls, capacity: int, seed: int, argument: str | None, profile: FrequencyProfile | None = None, **_: object
    ) -> ReuseLogit:
        # Without a profile (a live run without one) the profile feature is 0 and the rest still learns.
        if argument or profile is not None:
            profile = load_profile(cls.name, argument, profile)
        return cls(capacity, seed, profile)

    def bind(self, keys: list[ExpertKey]) -> np.ndarray:
        """Rows of `keys`; a new key's layer gets experts 0 .. its id (a block first, for a new layer),
        linked in id order."""
        index = self.index
        top: dict[int, int] = {}
        for layer, expert in keys:
            if (layer, expert) not in index:
                if expert < 0:
                    raise HarnessError(f"{self.name}: negative expert id {expert}")
                top[layer] = max(top.get(layer, -1), expert)
        if top:
            for layer in top:
                if layer not in self.blocks:
                    self._add_block(layer)
            dense = [(layer, e) for layer in sorted(top) for e in range(top[layer] + 1) if (layer, e) not in index]
            rows = super().bind(dense)
            for (layer, _), row in zip(dense, rows.tolist(), strict=True):
                at = BLOCK_INTS * self.blocks[layer]
                if self.g[at + BOUND_TOP] == NONE:
                    self.g[at + FIRST_ROW] = row
                else:
                    self.ki[self.g[at + BOUND_TOP], NEXT] = row
                self.g[at + BOUND_TOP] = row
        return super().bind(keys)

    def _add_block(self, layer: int) -> None:
        self.blocks[layer] = len(self.blocks)
        ints = np.array([_UNSET, _UNSET, 0, 0, NONE, NONE, NONE], dtype=np.int64)
        floats = np.concatenate([self._warm_weights(layer), np.zeros(BLOCK_FLOATS - FEATURES)])
        self.g = np.concatenate([self.g, ints])
        self.gf = np.concatenate([self.gf, floats])

    def _warm_weights(self, layer: int) -> np.ndarray:
        """The layer's starting weights: learned on the profile's steps of the layer where it has them, by a
        model of its own (the profile's accesses are not the scored run's)."""
        history = self.profile.history.get(layer, []) if self.profile is not None else []
        if not history:
            return start_weights()
        assert self.profile is not None
        kept = _WARM.get((id(history), len(history)))
        if kept is not None and kept[0] is history:
            _WARM.move_to_end((id(history), len(history)))
            return kept[1].copy()
        scratch = ReuseLogit(self.capacity, self.seed, FrequencyProfile(self.profile.counts, self.profile.steps))
        rows = scratch.bind([(layer, e) for experts in history for e in experts])
        bounds = np.concatenate([[0], np.cumsum([len(experts) for experts in history])]).astype(np.int64)
        learn(scratch.g, scratch.gf, scratch.ki, scratch.kf, rows, bounds)
        weights = scratch.weights(layer)
        _WARM[(id(history), len(history))] = (history, weights)
        while len(_WARM) > _WARM_KEPT:
            _WARM.popitem(last=False)
        return weights.copy()

    def new_rows(self, keys: list[ExpertKey]) -> tuple[np.ndarray, np.ndarray]:
        ki, kf = super().new_rows(keys)
        ki[:, BLOCK] = [self.blocks[layer] for layer, _ in keys]
        if self.profile is not None:
            rates = np.array([self.profile.rate(key) for key in keys], dtype=np.float64)
            kf[:, PROFILE] = np.log(np.maximum(rates, PROFILE_FLOOR))
        return ki, kf

    def weights(self, layer: int) -> np.ndarray:
        """A copy of the layer's current weights (bias, log-rates, recency, recent steps, profile)."""
        at = BLOCK_FLOATS * self.blocks[layer] + WEIGHTS
        return self.gf[at : at + FEATURES].copy()

    def reset(self) -> None:
        self.__init__(self.capacity, self.seed, self.profile)  # type: ignore[misc]

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "lambdas_per_step": LAMBDAS.tolist(),
            "learning_rate": LEARNING_RATE,
            "recent_steps": RECENT_STEPS,
            "profile": self.profile.source if self.profile is not None else None,
            "warm_start": bool(self.profile is not None and self.profile.history),
            "admission": "incoming predicted reuse >= victim's",
        }
