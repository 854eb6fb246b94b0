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
compiled replay call the same functions. State: per layer a block of int globals (`g`: step clocks, the
number of experts seen and of them those predicted, where its floats start and for how many experts) and an
area of `gf`: the weights, the decayed step counts, then a panel of per-expert columns,
each one contiguous and indexed by expert id (decayed counts, log-rates, prediction, profile feature, last use,
pending flag, recent-step indicators, the SGD's error), so that the per-step sweep over a layer's experts runs
as SIMD loops (its exp and log: `harness.cache.vmath`). A key's row holds only its layer's block. A panel is
allocated for the largest expert id bound in the layer, rounded up to `PANEL_ROUND`, and moved to a wider one
(`bind`) when a larger id is bound.
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
    ranks_below_by,
)
from harness.cache.jit import KERNEL, njit
from harness.cache.policies.static import load_profile
from harness.cache.profile import FrequencyProfile
from harness.cache.registry import register_policy
from harness.cache.vmath import exp64, log64
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
_NEVER = -float(1 << 40)  # last-use step of an expert never used: recency feature 1 / huge = 0
_UNSET = -(1 << 62)
"""A layer's pending or settled step where there is none."""

RATES = len(LAMBDAS)
FEATURES = 1 + RATES + 1 + RECENT_STEPS + 1
"""Bias, log-rates, recency, recent-step indicators, profile."""

BLOCK = FIRST_COLUMN
"""The key's one own column: its layer's block."""
PENDING_NOW, SETTLED_NOW, SIZE, SCORED, AREA, WIDTH = range(6)
"""A layer's int globals, at g[BLOCK_INTS * block:]: the step being accumulated, the last step learned from, the
experts seen (and of them, those predicted at the last step learned from), where the layer's floats start in `gf`
and the experts its panel has room for."""
BLOCK_INTS = 6
WEIGHTS, STEPS = 0, FEATURES
"""A layer's floats, from gf[AREA]: its weights, its decayed step counts (one per lambda)."""
HEAD = FEATURES + RATES
"""Where the layer's panel starts in its floats."""
CRF, RATE = 0, RATES
"""Panel columns (each WIDTH long, indexed by expert id): decayed counts per lambda, their log-rates (as of the
layer's decayed step counts), the predicted reuse logit (-inf until the first step learned after the expert
joined the layer), the profile feature, the last use (_NEVER: none), whether the expert is needed at the pending
step (0 or 1), the recent-step indicators (1: needed k + 1 steps ago), the SGD's per-expert error (scratch)."""
SCORE, PROFILE, LAST, PENDING = 2 * RATES, 2 * RATES + 1, 2 * RATES + 2, 2 * RATES + 3
RECENT = PENDING + 1
ERROR = RECENT + RECENT_STEPS
COLUMNS = ERROR + 1
PANEL_ROUND = 8
"""A panel's width is a multiple of it (whole SIMD vectors per column)."""

BLOCK_SIG: Any = types.none(*STATE, types.int64) if types is not None else None
LEARN_SIG: Any = types.none(*STATE, types.int64[:], types.int64[:]) if types is not None else None


@njit(**KERNEL, inline="always")
def _column(gf: np.ndarray, g: np.ndarray, at: int, column: int, n: int) -> np.ndarray:
    """The first n values of panel column `column` of the layer whose int globals start at g[at:]."""
    start = g[at + AREA] + HEAD + column * g[at + WIDTH]
    return gf[start : start + n]


@njit(**KERNEL, inline="always")
def _logits(gf: np.ndarray, g: np.ndarray, at: int, first: int, size: int, now: int, out: np.ndarray) -> None:
    """out[e - first] = the layer's weights times the features of expert e at step `now`, for first <= e < size
    (its log-rates as stored)."""
    w = gf[g[at + AREA] + WEIGHTS : g[at + AREA] + WEIGHTS + FEATURES]
    last = _column(gf, g, at, LAST, size)
    profile = _column(gf, g, at, PROFILE, size)
    for e in range(first, size):
        out[e - first] = w[0]
    for i in range(RATES):
        rate, wi = _column(gf, g, at, RATE + i, size), w[1 + i]
        for e in range(first, size):
            out[e - first] += rate[e] * wi
    wr = w[1 + RATES]
    for e in range(first, size):
        out[e - first] += (1.0 / max(now - last[e], 1.0)) * wr
    for k in range(RECENT_STEPS):
        recent, wk = _column(gf, g, at, RECENT + k, size), w[2 + RATES + k]
        for e in range(first, size):
            out[e - first] += recent[e] * wk
    wp = w[FEATURES - 1]
    for e in range(first, size):
        out[e - first] += profile[e] * wp


@njit(**KERNEL, inline="always")
def _dot(a: np.ndarray, b: np.ndarray, n: int) -> float:
    """sum(a[:n] * b[:n]) in four interleaved partial sums (four independent chains of additions, which also
    vectorise): a fixed order, the same on every machine."""
    s0 = s1 = s2 = s3 = 0.0
    quads = n - n % 4
    for e in range(0, quads, 4):
        s0 += a[e] * b[e]
        s1 += a[e + 1] * b[e + 1]
        s2 += a[e + 2] * b[e + 2]
        s3 += a[e + 3] * b[e + 3]
    for e in range(quads, n):
        s0 += a[e] * b[e]
    return (s0 + s1) + (s2 + s3)


@njit(BLOCK_SIG, **KERNEL, inline="always")
def settle(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, block: int) -> None:
    """Learn from the layer's pending step (its experts are the positives), then add it to the history and
    predict every expert's reuse at the next step. Inlined where it is called."""
    at = BLOCK_INTS * block
    now = g[at + PENDING_NOW]
    if now == _UNSET:
        return
    size = g[at + SIZE]
    settled = g[at + SETTLED_NOW]
    area = g[at + AREA]
    # The prediction made at the last step learned from is this step's logit (same weights and features)
    # where this step is the next one; experts seen since have none.
    predicted = g[at + SCORED] if settled != _UNSET and now == settled + 1 else 0
    score, pending = _column(gf, g, at, SCORE, size), _column(gf, g, at, PENDING, size)
    error = _column(gf, g, at, ERROR, size)
    for e in range(predicted):
        error[e] = score[e]
    _logits(gf, g, at, predicted, size, now, error[predicted:])
    for e in range(size):
        error[e] = pending[e] - 1.0 / (1.0 + exp64(-error[e]))
    # One SGD step on the mean gradient: the error times each feature, summed over the layer's experts.
    w = gf[area + WEIGHTS : area + WEIGHTS + FEATURES]
    last = _column(gf, g, at, LAST, size)
    recency = 0.0
    for e in range(size):
        recency += (1.0 / max(now - last[e], 1.0)) * error[e]
    gradient_bias = 0.0
    for e in range(size):
        gradient_bias += error[e]
    w[0] += LEARNING_RATE * gradient_bias / size
    for i in range(RATES):
        w[1 + i] += LEARNING_RATE * _dot(_column(gf, g, at, RATE + i, size), error, size) / size
    w[1 + RATES] += LEARNING_RATE * recency / size
    for k in range(RECENT_STEPS):
        w[2 + RATES + k] += LEARNING_RATE * _dot(_column(gf, g, at, RECENT + k, size), error, size) / size
    w[FEATURES - 1] += LEARNING_RATE * _dot(_column(gf, g, at, PROFILE, size), error, size) / size
    # The step joins the history: decayed counts and their log-rates, last uses, recent-step indicators.
    for i in range(RATES):
        decay = np.exp2(-LAMBDAS[i] * (now - settled)) if settled != _UNSET else 1.0
        steps = gf[area + STEPS + i] * decay + 1.0
        gf[area + STEPS + i] = steps
        log_steps = math.log(steps + PRIOR_STEPS)
        crf, rate = _column(gf, g, at, CRF + i, size), _column(gf, g, at, RATE + i, size)
        for e in range(size):
            count = crf[e] * decay + pending[e]
            crf[e] = count
            rate[e] = log64(count + PRIOR_HITS) - log_steps
    for e in range(size):
        last[e] = now if pending[e] != 0.0 else last[e]
    for k in range(RECENT_STEPS - 1, -1, -1):  # each indicator a step older; the column before RECENT is PENDING
        recent, newer = _column(gf, g, at, RECENT + k, size), _column(gf, g, at, RECENT + k - 1, size)
        for e in range(size):
            recent[e] = newer[e]
    for e in range(size):
        pending[e] = 0.0
    _logits(gf, g, at, 0, size, now + 1, score)
    g[at + SETTLED_NOW] = now
    g[at + SCORED] = size
    g[at + PENDING_NOW] = _UNSET


@njit(KEY_SIG, **KERNEL)
def _grow(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    """The key's expert and every smaller id join the layer's experts (never used, no prediction yet)."""
    at = BLOCK_INTS * ki[key, BLOCK]
    size, top = g[at + SIZE], ki[key, EXPERT] + 1
    if top <= size:
        return
    for i in range(RATES):
        crf, rate = _column(gf, g, at, CRF + i, top), _column(gf, g, at, RATE + i, top)
        log_steps = math.log(gf[g[at + AREA] + STEPS + i] + PRIOR_STEPS)
        for e in range(size, top):
            rate[e] = log64(crf[e] + PRIOR_HITS) - log_steps
    g[at + SIZE] = top


@njit(ACCESS_SIG, **KERNEL)
def _access(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int, hit: bool) -> None:
    at = BLOCK_INTS * ki[key, BLOCK]
    if g[at + PENDING_NOW] != now:
        settle(g, gf, ki, kf, ki[key, BLOCK])
    _grow(g, gf, ki, kf, key, now)
    _column(gf, g, at, PENDING, ki[key, EXPERT] + 1)[ki[key, EXPERT]] = 1.0
    g[at + PENDING_NOW] = now


@njit(**KERNEL, inline="always")
def _standing(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, key: int) -> tuple[float, float]:
    """The key's predicted reuse and last use, the first two places of the eviction order (`ranks_below_by`)."""
    at = BLOCK_INTS * ki[key, BLOCK]
    start, width = g[at + AREA] + HEAD + ki[key, EXPERT], g[at + WIDTH]
    return gf[start + SCORE * width], gf[start + LAST * width]


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
    best, best_score, best_last = NONE, 0.0, 0.0
    for key in resident:
        if key >= 0 and mark[key] != tag:
            if g[BLOCK_INTS * ki[key, BLOCK] + PENDING_NOW] != _UNSET:
                settle(g, gf, ki, kf, ki[key, BLOCK])
            score, last = _standing(g, gf, ki, key)
            if best == NONE or ranks_below_by(score, last, key, best_score, best_last, best, ki):
                best, best_score, best_last = key, score, last
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
) -> int:
    """The miss goes in where its predicted reuse ranks above the would-be victim's."""
    victim = _victim(g, gf, ki, kf, resident, mark, tag, incoming, now)
    score, last = _standing(g, gf, ki, victim)
    incoming_score, incoming_last = _standing(g, gf, ki, incoming)
    return victim if ranks_below_by(score, last, victim, incoming_score, incoming_last, incoming, ki) else NONE


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
    int_columns = (NONE,)

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
        """Rows of `keys`; a new key's layer gets a block (a new layer) or a panel wide enough for its id."""
        top: dict[int, int] = {}
        for layer, expert in keys:
            if (layer, expert) not in self.index:
                if expert < 0:
                    raise HarnessError(f"{self.name}: negative expert id {expert}")
                top[layer] = max(top.get(layer, -1), expert)
        for layer, expert in top.items():
            if layer not in self.blocks:
                self._add_block(layer, expert + 1)
            elif expert >= self.g[BLOCK_INTS * self.blocks[layer] + WIDTH]:
                self._widen(layer, expert + 1)
        return super().bind(keys)

    def _panel(self, layer: int, width: int) -> np.ndarray:
        """A fresh panel [COLUMNS, width]: experts never used, no prediction, their profile feature."""
        panel = np.zeros((COLUMNS, width))
        panel[SCORE] = -math.inf
        panel[LAST] = _NEVER
        if self.profile is not None:
            rates = np.array([self.profile.rate((layer, e)) for e in range(width)], dtype=np.float64)
            panel[PROFILE] = np.log(np.maximum(rates, PROFILE_FLOOR))
        return panel

    def _add_block(self, layer: int, experts: int) -> None:
        self.blocks[layer] = len(self.blocks)
        width = -(-experts // PANEL_ROUND) * PANEL_ROUND
        head = np.concatenate([self._warm_weights(layer), np.zeros(RATES)])
        ints = np.array([_UNSET, _UNSET, 0, 0, len(self.gf), width], dtype=np.int64)
        self.g = np.concatenate([self.g, ints])
        self.gf = np.concatenate([self.gf, head, self._panel(layer, width).ravel()])

    def _widen(self, layer: int, experts: int) -> None:
        """Move the layer's floats to the end of `gf` with a panel for `experts` at least (twice its width at
        least, so that a live run's ids found one by one move it a few times only), the rest of `gf` closing up."""
        at = BLOCK_INTS * self.blocks[layer]
        area, width = int(self.g[at + AREA]), int(self.g[at + WIDTH])
        wider = -(-max(experts, 2 * width) // PANEL_ROUND) * PANEL_ROUND
        panel = self._panel(layer, wider)
        panel[:, :width] = self.gf[area + HEAD : area + HEAD + COLUMNS * width].reshape(COLUMNS, width)
        end = area + HEAD + COLUMNS * width
        moved = np.concatenate([self.gf[:area], self.gf[end:], self.gf[area : area + HEAD], panel.ravel()])
        blocks = self.g[: BLOCK_INTS * len(self.blocks)].reshape(-1, BLOCK_INTS)
        blocks[blocks[:, AREA] > area, AREA] -= end - area
        self.g[at + AREA], self.g[at + WIDTH] = len(self.gf) - (end - area), wider
        self.gf = moved

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
        return ki, kf

    def _area(self, layer: int) -> tuple[int, int]:
        at = BLOCK_INTS * self.blocks[layer]
        return int(self.g[at + AREA]), int(self.g[at + WIDTH])

    def weights(self, layer: int) -> np.ndarray:
        """A copy of the layer's current weights (bias, log-rates, recency, recent steps, profile)."""
        area, _ = self._area(layer)
        return self.gf[area + WEIGHTS : area + WEIGHTS + FEATURES].copy()

    def decayed_steps(self, layer: int) -> np.ndarray:
        """A copy of the layer's decayed step counts, one per lambda."""
        area, _ = self._area(layer)
        return self.gf[area + STEPS : area + STEPS + RATES].copy()

    def panel(self, layer: int) -> np.ndarray:
        """A copy of the layer's per-expert columns [COLUMNS, experts seen] (`CRF`, `RATE`, ... `ERROR`)."""
        area, width = self._area(layer)
        size = int(self.g[BLOCK_INTS * self.blocks[layer] + SIZE])
        return self.gf[area + HEAD : area + HEAD + COLUMNS * width].reshape(COLUMNS, width)[:, :size].copy()

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
