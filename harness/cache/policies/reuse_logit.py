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
area of `gf`: the weights and the decayed step counts (float64), then a panel of per-expert columns (float32,
each one contiguous and indexed by expert id: decayed counts, log-rates, prediction, profile feature, age,
pending flag, recent-step indicators, recency, the SGD's error), so that the per-step sweep over a layer's
experts runs as SIMD loops, 8 experts a vector (its exp and log: `harness.cache.vmath`). A key's row holds only
its layer's block. A panel is allocated for the largest expert id bound in the layer, rounded up to
`PANEL_ROUND`, and moved to a wider one (`bind`) when a larger id is bound.

Precision: the per-expert values are float32, as the FlashMoE network's; the gradient sums each feature over the
experts in a fixed order, the same on every machine. An expert's last use is kept as its age at the layer's last
step learned from, exact up to 2^24 steps (beyond, its recency feature is below 6e-8 either way).
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
from harness.cache.vmath import expf, logf
from harness.errors import HarnessError
from harness.keys import ExpertKey

try:
    from numba import types
except ImportError:  # njit is the identity (harness.cache.jit)
    types = None  # type: ignore[assignment]

LAMBDAS = np.array([0.0, 0.01, 0.03, 0.1, 0.3])
"""Decays per token step of the log-rate features (LRFU's lambda): lifetime counts to a few steps."""
STEP_DECAYS = np.exp2(-LAMBDAS)
"""The decays over one step (the usual time between a layer's steps), so that a step needs no exp2 call."""
RECENT_STEPS = 3
"""Indicator features: needed at the layer's previous step, the one before, and so on."""
START_LAMBDA_INDEX = 1
"""The feature whose weight starts at 1: LRFU's default lambda (0.01)."""
LEARNING_RATE = 0.1
"""SGD step on the mean logistic-loss gradient of a layer's experts, per token step."""
PRIOR_HITS, PRIOR_STEPS = 0.5, 5.0
PROFILE_FLOOR = 1e-3
_UNSET = -(1 << 62)
"""A layer's pending or settled step where there is none."""
_ZERO, _ONE, _PRIOR_HITS = np.float32(0.0), np.float32(1.0), np.float32(PRIOR_HITS)
"""float32 constants: a Python float in a float32 expression would make numba compute it in float64."""
_NEGLIGIBLE = np.float32(2.0**-25)
"""A decayed count below it is kept as 0: added to PRIOR_HITS (0.5) or to an access (1) it rounds away in float32,
so the log-rates are the same, and it would otherwise decay into subnormal floats (below 2^-126, after 420
steps without a use at lambda = 0.3), whose arithmetic is many times slower."""

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
"""A layer's float64 values, from gf[AREA]: its weights, its decayed step counts (one per lambda)."""
HEAD = FEATURES + RATES
"""Where the layer's panel starts in its float64 values."""
CRF, RATE = 0, RATES
"""Panel columns (float32, each WIDTH long, indexed by expert id): decayed counts per lambda, their log-rates (as
of the layer's decayed step counts), the predicted reuse logit (-inf until the first step learned after the expert
joined the layer), the profile feature, the age (steps from the last use to the layer's last step learned from;
inf: never used), whether the expert is needed at the pending step (0 or 1), the recent-step indicators (1: needed
k + 1 steps ago), the recency feature at the step being scored and the SGD's per-expert error (scratch)."""
SCORE, PROFILE, AGE, PENDING = 2 * RATES, 2 * RATES + 1, 2 * RATES + 2, 2 * RATES + 3
RECENT = PENDING + 1
RECENCY = RECENT + RECENT_STEPS
ERROR = RECENCY + 1
COLUMNS = ERROR + 1
FEATURE_COLUMNS = (*range(RATE, RATE + RATES), RECENCY, *range(RECENT, RECENT + RECENT_STEPS), PROFILE)
"""The panel column of each feature after the bias, in the order of the weights (an even number of them: the
gradient takes them two at a time)."""
assert len(FEATURE_COLUMNS) == FEATURES - 1 and len(FEATURE_COLUMNS) % 2 == 0
assert RATES == 5 and RECENT_STEPS == 3, "_logits spells out five log-rates and three recent-step indicators"
PANEL_ROUND = 8
"""A panel's width is a multiple of it: whole float32 SIMD vectors per column, and an even number of float32
values, so that the panel fills whole float64 words of `gf`."""

BLOCK_SIG: Any = types.none(*STATE, types.int64) if types is not None else None
LEARN_SIG: Any = types.none(*STATE, types.int64[:], types.int64[:]) if types is not None else None


@njit(**KERNEL, inline="always")
def _column(gf: np.ndarray, g: np.ndarray, at: int, column: int, n: int) -> np.ndarray:
    """The first n values of panel column `column` (float32) of the layer whose int globals start at g[at:]."""
    start = 2 * (g[at + AREA] + HEAD) + column * g[at + WIDTH]
    return gf.view(np.float32)[start : start + n]


@njit(**KERNEL, inline="always")
def _recency(gf: np.ndarray, g: np.ndarray, at: int, size: int, ahead: np.float32) -> None:
    """The recency feature, 1 / (steps since the last use), at `ahead` steps after the layer's last step learned
    from, into the RECENCY column: 0 for an expert never used (1 / inf)."""
    age, recency = _column(gf, g, at, AGE, size), _column(gf, g, at, RECENCY, size)
    for e in range(size):
        recency[e] = _recency_of(age[e], ahead)


@njit(**KERNEL, inline="always")
def _recency_of(age: np.float32, ahead: np.float32) -> np.float32:
    """1 / (steps since the last use) for an expert of age `age`, `ahead` steps on (0 where the age is inf)."""
    return _ONE / max(age + ahead, _ONE)


@njit(**KERNEL, inline="always")
def _error(needed: np.float32, logit: np.float32) -> np.float32:
    """The logistic loss's gradient in the logit, with the sign of an SGD step: needed (0 or 1) - sigmoid(logit)."""
    return needed - _ONE / (_ONE + expf(-logit))


@njit(**KERNEL, inline="always")
def _log_rate(count: np.float32, log_steps: np.float32) -> np.float32:
    """A log-rate feature: log(count + PRIOR_HITS) - log(steps + PRIOR_STEPS), the latter given."""
    return logf(count + _PRIOR_HITS) - log_steps


@njit(**KERNEL, inline="always")
def _log_steps(steps: float) -> np.float32:
    """log(decayed step count + PRIOR_STEPS), the log-rates' denominator."""
    return logf(np.float32(steps + PRIOR_STEPS))


@njit(**KERNEL, inline="always")
def _logits(gf: np.ndarray, g: np.ndarray, at: int, first: int, size: int, out: np.ndarray) -> None:
    """out[e - first] = the layer's weights times the features of expert e, for first <= e < size (its log-rates
    as stored, the RECENCY column as filled), in float32, the features added in their order. Two passes of a few
    columns each, not one per feature: fewer passes over `out`, and few enough columns for LLVM's overlap checks,
    beyond which it would not vectorise the loop. The features are spelled out (RATES = 5, RECENT_STEPS = 3)."""
    w = gf[g[at + AREA] + WEIGHTS : g[at + AREA] + WEIGHTS + FEATURES]
    bias = np.float32(w[0])
    w0, w1, w2, w3, w4 = np.float32(w[1]), np.float32(w[2]), np.float32(w[3]), np.float32(w[4]), np.float32(w[5])
    r0, r1, r2 = _column(gf, g, at, RATE, size), _column(gf, g, at, RATE + 1, size), _column(gf, g, at, RATE + 2, size)
    r3, r4 = _column(gf, g, at, RATE + 3, size), _column(gf, g, at, RATE + 4, size)
    recency, wr = _column(gf, g, at, RECENCY, size), np.float32(w[1 + RATES])
    for e in range(first, size):
        rates = (((bias + r0[e] * w0) + r1[e] * w1) + r2[e] * w2) + r3[e] * w3
        out[e - first] = (rates + r4[e] * w4) + recency[e] * wr
    k0, k1, k2 = np.float32(w[2 + RATES]), np.float32(w[3 + RATES]), np.float32(w[4 + RATES])
    recent0, recent1 = _column(gf, g, at, RECENT, size), _column(gf, g, at, RECENT + 1, size)
    recent2, profile = _column(gf, g, at, RECENT + 2, size), _column(gf, g, at, PROFILE, size)
    wp = np.float32(w[FEATURES - 1])
    for e in range(first, size):
        out[e - first] = (((out[e - first] + recent0[e] * k0) + recent1[e] * k1) + recent2[e] * k2) + profile[e] * wp


@njit(**KERNEL, inline="always")
def _dot2(a: np.ndarray, b: np.ndarray, x: np.ndarray, n: int) -> tuple[float, float]:
    """(sum(a[:n] * x[:n]), sum(b[:n] * x[:n])) in float32, each in four interleaved partial sums: a fixed order,
    the same on every machine, and eight independent chains of additions, where one sum's four would wait on
    the latency of each addition."""
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = _ZERO
    quads = n - n % 4
    for e in range(0, quads, 4):
        a0 += a[e] * x[e]
        a1 += a[e + 1] * x[e + 1]
        a2 += a[e + 2] * x[e + 2]
        a3 += a[e + 3] * x[e + 3]
        b0 += b[e] * x[e]
        b1 += b[e + 1] * x[e + 1]
        b2 += b[e + 2] * x[e + 2]
        b3 += b[e + 3] * x[e + 3]
    for e in range(quads, n):
        a0 += a[e] * x[e]
        b0 += b[e] * x[e]
    return float((a0 + a1) + (a2 + a3)), float((b0 + b1) + (b2 + b3))


@njit(**KERNEL, inline="always")
def _sum(a: np.ndarray, n: int) -> float:
    """sum(a[:n]) in float32, summed as `_dot2` sums."""
    s0 = s1 = s2 = s3 = _ZERO
    quads = n - n % 4
    for e in range(0, quads, 4):
        s0 += a[e]
        s1 += a[e + 1]
        s2 += a[e + 2]
        s3 += a[e + 3]
    for e in range(quads, n):
        s0 += a[e]
    return float((s0 + s1) + (s2 + s3))


@njit(**KERNEL, inline="always")
def _decay_step(gf: np.ndarray, area: int, i: int, now: int, settled: int) -> tuple[np.float32, np.float32]:
    """Decay the layer's step count for LAMBDAS[i] to step `now` and count that step; returns the decay (float32)
    and log(step count + PRIOR_STEPS), the log-rates' denominator."""
    if settled == _UNSET:
        decay = 1.0
    elif now == settled + 1:
        decay = STEP_DECAYS[i]
    else:
        decay = np.exp2(-LAMBDAS[i] * (now - settled))
    steps = gf[area + STEPS + i] * decay + 1.0
    gf[area + STEPS + i] = steps
    return np.float32(decay), _log_steps(steps)


@njit(**KERNEL, inline="always")
def _decayed(count: np.float32, decay: np.float32, used: np.float32) -> np.float32:
    """A decayed count at the next step: count * decay + used (1: needed at it), negligible counts kept as 0."""
    count = count * decay + used
    return count if count >= _NEGLIGIBLE else _ZERO


@njit(BLOCK_SIG, **KERNEL, inline="always")
def settle(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, block: int) -> None:
    """Learn from the layer's pending step (its experts are the positives), then add it to the history and
    predict every expert's reuse at the next step. Per-expert values in float32 (8 SIMD lanes), the weights and
    decayed step counts in float64. Inlined where it is called."""
    at = BLOCK_INTS * block
    now = g[at + PENDING_NOW]
    if now == _UNSET:
        return
    size = g[at + SIZE]
    settled = g[at + SETTLED_NOW]
    area = g[at + AREA]
    elapsed = np.float32(now - settled) if settled != _UNSET else _ZERO  # ages are inf before any step
    # The prediction made at the last step learned from is this step's logit (same weights and features)
    # where this step is the next one; experts seen since have none.
    # The recency column holds the recency at the next step already (the last settle's age pass), and experts seen
    # since have recency 0 (never used) either way.
    following = settled != _UNSET and now == settled + 1
    predicted = g[at + SCORED] if following else 0
    score, pending = _column(gf, g, at, SCORE, size), _column(gf, g, at, PENDING, size)
    error, recency = _column(gf, g, at, ERROR, size), _column(gf, g, at, RECENCY, size)
    if not following:
        _recency(gf, g, at, size, elapsed)
    for e in range(predicted):
        error[e] = _error(pending[e], score[e])
    _logits(gf, g, at, predicted, size, error[predicted:])
    for e in range(predicted, size):
        error[e] = _error(pending[e], error[e])
    # One SGD step on the mean gradient: the error times each feature, summed over the layer's experts.
    w = gf[area + WEIGHTS : area + WEIGHTS + FEATURES]
    w[0] += LEARNING_RATE * _sum(error, size) / size
    for j in range(0, FEATURES - 1, 2):
        first, second = _column(gf, g, at, FEATURE_COLUMNS[j], size), _column(gf, g, at, FEATURE_COLUMNS[j + 1], size)
        gradient_first, gradient_second = _dot2(first, second, error, size)
        w[1 + j] += LEARNING_RATE * gradient_first / size
        w[2 + j] += LEARNING_RATE * gradient_second / size
    # The step joins the history: decayed counts and their log-rates, ages, recent-step indicators.
    for i in range(0, RATES, 2):  # two lambdas a pass (the last alone): a few columns for LLVM's overlap checks
        crf, rate = _column(gf, g, at, CRF + i, size), _column(gf, g, at, RATE + i, size)
        decay, log_step = _decay_step(gf, area, i, now, settled)
        if i + 1 < RATES:
            crf2, rate2 = _column(gf, g, at, CRF + i + 1, size), _column(gf, g, at, RATE + i + 1, size)
            decay2, log_step2 = _decay_step(gf, area, i + 1, now, settled)
            for e in range(size):
                count = _decayed(crf[e], decay, pending[e])
                count2 = _decayed(crf2[e], decay2, pending[e])
                crf[e], crf2[e] = count, count2
                rate[e], rate2[e] = _log_rate(count, log_step), _log_rate(count2, log_step2)
        else:
            for e in range(size):
                count = _decayed(crf[e], decay, pending[e])
                crf[e] = count
                rate[e] = _log_rate(count, log_step)
    age = _column(gf, g, at, AGE, size)
    for e in range(size):  # and the recency feature at the next step
        aged = age[e] + elapsed  # read whether or not it is kept: a conditional read stops LLVM's vectoriser
        age[e] = _ZERO if pending[e] != _ZERO else aged
        recency[e] = _recency_of(age[e], _ONE)
    recent0, recent1 = _column(gf, g, at, RECENT, size), _column(gf, g, at, RECENT + 1, size)
    recent2 = _column(gf, g, at, RECENT + 2, size)
    for e in range(size):  # each indicator a step older
        recent2[e], recent1[e], recent0[e], pending[e] = recent1[e], recent0[e], pending[e], _ZERO
    _logits(gf, g, at, 0, size, score)
    g[at + SETTLED_NOW] = now
    g[at + SCORED] = size
    g[at + PENDING_NOW] = _UNSET


settle_out_of_line = njit(BLOCK_SIG, **KERNEL)(settle.py_func)
"""`settle` as a function of its own, for a call in a loop that should stay small."""


@njit(KEY_SIG, **KERNEL)
def _grow(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int) -> None:
    """The key's expert and every smaller id join the layer's experts (never used, no prediction yet)."""
    at = BLOCK_INTS * ki[key, BLOCK]
    size, top = g[at + SIZE], ki[key, EXPERT] + 1
    if top <= size:
        return
    for i in range(RATES):
        crf, rate = _column(gf, g, at, CRF + i, top), _column(gf, g, at, RATE + i, top)
        log_steps = _log_steps(gf[g[at + AREA] + STEPS + i])
        for e in range(size, top):
            rate[e] = _log_rate(crf[e], log_steps)
    g[at + SIZE] = top


@njit(ACCESS_SIG, **KERNEL)
def _access(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int, hit: bool) -> None:
    at = BLOCK_INTS * ki[key, BLOCK]
    if g[at + PENDING_NOW] != now:
        settle(g, gf, ki, kf, ki[key, BLOCK])
    _grow(g, gf, ki, kf, key, now)
    _column(gf, g, at, PENDING, ki[key, EXPERT] + 1)[ki[key, EXPERT]] = _ONE
    g[at + PENDING_NOW] = now


@njit(**KERNEL, inline="always")
def _standing(g: np.ndarray, values: np.ndarray, ki: np.ndarray, key: int) -> tuple[float, float]:
    """The key's predicted reuse and last use (its layer's last step learned from, less its age; -inf: never used),
    the first two places of the eviction order (`ranks_below_by`). The key's layer has learned its pending step.
    `values` is `gf` as float32 values, taken once by the caller (each view checks the array's layout)."""
    at = BLOCK_INTS * ki[key, BLOCK]
    start, width = 2 * (g[at + AREA] + HEAD) + ki[key, EXPERT], g[at + WIDTH]
    return float(values[start + SCORE * width]), float(g[at + SETTLED_NOW]) - float(values[start + AGE * width])


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
    values = gf.view(np.float32)
    best, best_score, best_last = NONE, 0.0, 0.0
    for key in resident:
        if key >= 0 and mark[key] != tag:
            if g[BLOCK_INTS * ki[key, BLOCK] + PENDING_NOW] != _UNSET:
                settle_out_of_line(g, gf, ki, kf, ki[key, BLOCK])
            score, last = _standing(g, values, ki, key)
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
    values = gf.view(np.float32)
    score, last = _standing(g, values, ki, victim)
    incoming_score, incoming_last = _standing(g, values, ki, incoming)
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
        """A fresh panel [COLUMNS, width] (float32): experts never used, no prediction, their profile feature."""
        panel = np.zeros((COLUMNS, width), dtype=np.float32)
        panel[SCORE] = -math.inf
        panel[AGE] = math.inf
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
        self.gf = np.concatenate([self.gf, head, self._panel(layer, width).ravel().view(np.float64)])

    def _widen(self, layer: int, experts: int) -> None:
        """Move the layer's floats to the end of `gf` with a panel for `experts` at least (twice its width at
        least, so that a live run's ids found one by one move it a few times only), the rest of `gf` closing up."""
        at = BLOCK_INTS * self.blocks[layer]
        area, width = int(self.g[at + AREA]), int(self.g[at + WIDTH])
        wider = -(-max(experts, 2 * width) // PANEL_ROUND) * PANEL_ROUND
        panel = self._panel(layer, wider)
        end = area + HEAD + COLUMNS * width // 2  # the panel's float32 values fill whole float64 words
        panel[:, :width] = self.gf[area + HEAD : end].view(np.float32).reshape(COLUMNS, width)
        words = panel.ravel().view(np.float64)
        moved = np.concatenate([self.gf[:area], self.gf[end:], self.gf[area : area + HEAD], words])
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
        """A copy of the layer's per-expert columns [COLUMNS, experts seen] (`CRF`, `RATE`, ... `ERROR`), float32."""
        area, width = self._area(layer)
        size = int(self.g[BLOCK_INTS * self.blocks[layer] + SIZE])
        words = self.gf[area + HEAD : area + HEAD + COLUMNS * width // 2]
        return words.view(np.float32).reshape(COLUMNS, width)[:, :size].copy()

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
