"""A frequency profile: how often each (layer, expert) was needed in a part of a trace, and over how many
token steps of its layer, and the steps themselves (a learned policy warms up on them). Built by the
simulator from the training part of a split (`harness simulate --split`) or from a trace file
(`static:PATH`); read by the profile-based policies. No bytes, no I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from harness.keys import ExpertKey


@dataclass
class FrequencyProfile:
    counts: dict[ExpertKey, int] = field(default_factory=dict)
    """Accesses per key (one per token step that needs it)."""
    steps: dict[int, int] = field(default_factory=dict)
    """Token steps per layer: a key's rate per step of its layer is counts[key] / steps[layer]."""
    source: str = ""
    history: dict[int, list[tuple[int, ...]]] = field(default_factory=dict)
    """Per layer, the experts of each of its token steps, in order (empty where the profile holds counts only):
    the stream a learned policy warms up on (`reuse-logit`)."""

    @classmethod
    def from_calls(cls, calls: Iterable[tuple[int, tuple[ExpertKey, ...]]], source: str = "") -> FrequencyProfile:
        """From (layer, distinct keys of the step) pairs, one per token step of a layer."""
        profile = cls(source=source)
        counts, steps, history = profile.counts, profile.steps, profile.history
        for layer, keys in calls:
            steps[layer] = steps.get(layer, 0) + 1
            history.setdefault(layer, []).append(tuple(e for _, e in keys))
            for key in keys:
                counts[key] = counts.get(key, 0) + 1
        return profile

    def rate(self, key: ExpertKey) -> float:
        steps = self.steps.get(key[0], 0)
        return self.counts.get(key, 0) / steps if steps else 0.0

    def ranking(self) -> dict[ExpertKey, int]:
        """Rank of each profiled key, 0 the most frequent; equal counts by key."""
        return {key: i for i, key in enumerate(sorted(self.counts, key=lambda k: (-self.counts[k], k)))}
