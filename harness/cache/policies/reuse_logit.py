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
learns on the profile's steps of that layer (warm start, at the layer's first step) and then starts its
history afresh with the weights it learned; nothing is fitted on the scored part beforehand, so what it
learns there it learns as a live run would.

Ties go to the less recent last use, then the smaller key. No future, no bytes: it runs live as in replay.
"""

from __future__ import annotations

import math
from collections.abc import Set
from dataclasses import dataclass, field

import numpy as np

from harness.cache.base import CachePolicy
from harness.cache.policies.static import load_profile
from harness.cache.profile import FrequencyProfile
from harness.cache.registry import register_policy
from harness.errors import HarnessError
from harness.keys import ExpertKey

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


@dataclass
class _LayerModel:
    profile_log_rate: np.ndarray
    crf: np.ndarray = field(default_factory=lambda: np.zeros((len(LAMBDAS), 0)))
    steps: np.ndarray = field(default_factory=lambda: np.zeros(len(LAMBDAS)))
    last: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    recent: np.ndarray = field(default_factory=lambda: np.zeros((RECENT_STEPS, 0)))
    """Row k: 1 for the experts needed at the layer's (k+1)-th previous step."""
    weights: np.ndarray = field(default_factory=lambda: start_weights())
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pending: list[int] = field(default_factory=list)
    pending_now: int | None = None
    settled_now: int | None = None

    def features(self, now: int) -> np.ndarray:
        """[experts, features] at step `now`, from the accesses of earlier steps."""
        rates = np.log((self.crf + PRIOR_HITS) / (self.steps[:, None] + PRIOR_STEPS))
        recency = 1.0 / np.maximum(now - self.last, 1)
        profile = self.profile_log_rate[: len(self.last)]
        return np.vstack([np.ones(len(self.last)), rates, recency, self.recent, profile]).T

    def grow(self, experts: int) -> None:
        size = len(self.last)
        if experts <= size:
            return
        extra = experts - size
        self.crf = np.hstack([self.crf, np.zeros((len(LAMBDAS), extra))])
        self.last = np.concatenate([self.last, np.full(extra, _NEVER, dtype=np.int64)])
        self.recent = np.hstack([self.recent, np.zeros((RECENT_STEPS, extra))])
        self.scores = np.concatenate([self.scores, np.full(extra, -math.inf)])

    def settle(self) -> None:
        """Learn from the pending step (its experts are the positives), then add it to the history."""
        now = self.pending_now
        if now is None:
            return
        x = self.features(now)
        labels = np.zeros(len(self.last))
        labels[self.pending] = 1.0
        predicted = 1.0 / (1.0 + np.exp(-(x @ self.weights)))
        self.weights += LEARNING_RATE * (x.T @ (labels - predicted)) / len(labels)
        if self.settled_now is not None:  # decay by the token steps since the layer's previous step
            decay = np.exp2(-LAMBDAS * (now - self.settled_now))
            self.crf *= decay[:, None]
            self.steps *= decay
        self.steps += 1.0
        self.crf[:, self.pending] += 1.0
        self.last[self.pending] = now
        self.recent = np.roll(self.recent, 1, axis=0)
        self.recent[0] = 0.0
        self.recent[0, self.pending] = 1.0
        self.settled_now = now
        self.scores = self.features(now + 1) @ self.weights
        self.pending = []
        self.pending_now = None


def start_weights() -> np.ndarray:
    """Bias, log-rates, recency, recent-step indicators, profile: 1 on LRFU's lambda, 0 elsewhere."""
    weights = np.zeros(1 + len(LAMBDAS) + 1 + RECENT_STEPS + 1)
    weights[1 + START_LAMBDA_INDEX] = 1.0
    return weights


@register_policy
class ReuseLogit(CachePolicy):
    name = "reuse-logit"
    profiled = True

    def __init__(self, capacity: int, seed: int = 0, profile: FrequencyProfile | None = None) -> None:
        super().__init__(capacity, seed)
        self.profile = profile
        self._layers: dict[int, _LayerModel] = {}

    @classmethod
    def from_spec(
        cls, capacity: int, seed: int, argument: str | None, profile: FrequencyProfile | None = None, **_: object
    ) -> ReuseLogit:
        # Without a profile (a live run without one) the profile feature is 0 and the rest still learns.
        if argument or profile is not None:
            profile = load_profile(cls.name, argument, profile)
        return cls(capacity, seed, profile)

    def _layer(self, layer: int) -> _LayerModel:
        model = self._layers.get(layer)
        if model is None:
            experts = 1 + max((e for lay, e in self.profile.counts if lay == layer), default=-1) if self.profile else 0
            rates = np.array([self.profile.rate((layer, e)) for e in range(experts)]) if self.profile else np.zeros(0)
            model = self._layers[layer] = self._warm(layer, np.log(np.maximum(rates, PROFILE_FLOOR)))
        return model

    def _warm(self, layer: int, profile_log_rate: np.ndarray) -> _LayerModel:
        """A layer's model, with the weights learned on the profile's steps of the layer where it has them."""
        history = self.profile.history.get(layer, []) if self.profile is not None else []
        model = _LayerModel(profile_log_rate)
        if not history:
            return model
        for i, experts in enumerate(history):
            self._grow_profile(model, 1 + max(experts, default=-1))
            model.pending, model.pending_now = list(experts), i
            model.settle()
        # The history starts afresh: the profile's accesses are not the scored run's.
        return _LayerModel(model.profile_log_rate, weights=model.weights)

    def _grow_profile(self, model: _LayerModel, experts: int) -> None:
        missing = experts - len(model.profile_log_rate)
        if missing > 0:
            floor = math.log(PROFILE_FLOOR) if self.profile is not None else 0.0
            model.profile_log_rate = np.concatenate([model.profile_log_rate, np.full(missing, floor)])
        model.grow(experts)

    def on_step(self, layer: int, now: int) -> None:
        self._layer(layer).settle()

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        layer, expert = key
        if expert < 0:
            raise HarnessError(f"{self.name}: negative expert id {expert}")
        model = self._layer(layer)
        if model.pending_now not in (None, now):
            model.settle()
        self._grow_profile(model, expert + 1)
        model.pending.append(expert)
        model.pending_now = now

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self._grow_profile(self._layer(key[0]), key[1] + 1)  # a placed key may never have been accessed

    def _rank(self, key: ExpertKey) -> tuple[float, int, ExpertKey]:
        model = self._layers[key[0]]
        return float(model.scores[key[1]]), int(model.last[key[1]]), key

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        for layer in {incoming[0], *(k[0] for k in candidates)}:
            self._layer(layer).settle()
        return min(candidates, key=self._rank)

    def admit(self, incoming: ExpertKey, candidates: Set[ExpertKey], now: int) -> bool:
        victim = self.victim(candidates, incoming, now)
        return self._rank(incoming) > self._rank(victim)

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
