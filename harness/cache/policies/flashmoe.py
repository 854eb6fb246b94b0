"""FlashMoE learned eviction (Kim et al., arXiv 2601.17063), as POLICIES.md describes it.

Per layer, a small network (see `harness.cache.learned`) predicts each expert's normalised distance to
its next use from recency and frequency after the current step is routed; on a miss with a full cache
the candidate with the largest prediction leaves. It needs only the step's accesses, so the live engine
runs it as well as the simulator. Spec: `flashmoe:PATH` (a model file from `harness policy train`).
"""

from __future__ import annotations

import functools
from collections.abc import Set
from pathlib import Path

import numpy as np

from harness.cache.base import CachePolicy
from harness.cache.learned import FlashMoEModel, features
from harness.cache.registry import register_policy
from harness.errors import HarnessError
from harness.keys import ExpertKey


@functools.lru_cache(maxsize=4)
def _load(path: str, mtime_ns: int) -> FlashMoEModel:
    # Keyed by modification time too, so a retrained file is read again; per-layer scope builds one
    # policy per layer from the same file.
    return FlashMoEModel.load(path)


def load_model(path: str) -> FlashMoEModel:
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise HarnessError(f"FlashMoE model file {path} does not exist (train one with `harness policy train`)")
    return _load(str(resolved), resolved.stat().st_mtime_ns)


@register_policy
class FlashMoE(CachePolicy):
    name = "flashmoe"

    def __init__(self, capacity: int, seed: int = 0, model: FlashMoEModel | None = None) -> None:
        super().__init__(capacity, seed)
        if model is None:
            raise HarnessError("flashmoe needs a model: flashmoe:PATH (train one with `harness policy train`)")
        self.model = model
        e = model.num_experts
        self._last = {layer: np.full(e, -1, dtype=np.int64) for layer in model.nets}
        self._freq = {layer: np.zeros(e, dtype=np.float64) for layer in model.nets}
        self._pred: dict[int, tuple[int, np.ndarray]] = {}  # layer -> (now, prediction) while still valid

    @classmethod
    def from_spec(
        cls,
        capacity: int,
        seed: int,
        argument: str | None,
        flashmoe_model: FlashMoEModel | None = None,
        **_: object,
    ) -> FlashMoE:
        if flashmoe_model is None:
            if not argument:
                raise HarnessError("flashmoe needs a model file: flashmoe:PATH (train one with `harness policy train`)")
            flashmoe_model = load_model(argument)
        return cls(capacity, seed, flashmoe_model)

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        layer, expert = key
        last = self._last.get(layer)
        if last is None:
            raise HarnessError(f"the FlashMoE model has no network for layer {layer} (it has {sorted(self._last)})")
        if expert >= len(last):
            raise HarnessError(f"expert {expert} is outside the FlashMoE model's {len(last)} experts")
        last[expert] = now
        self._freq[layer][expert] += 1
        self._pred.pop(layer, None)

    def _prediction(self, layer: int, now: int) -> np.ndarray:
        cached = self._pred.get(layer)
        if cached is not None and cached[0] == now:
            return cached[1]
        pred = self.model.nets[layer].predict(features(self._last[layer], self._freq[layer], now))
        self._pred[layer] = (now, pred)
        return pred

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        best_key: ExpertKey | None = None
        best = -1.0
        for key in candidates:
            score = float(self._prediction(key[0], now)[key[1]])
            # Ties (equal predictions) go to the larger key, so the choice does not depend on set order.
            if score > best or (score == best and best_key is not None and key > best_key):
                best, best_key = score, key
        assert best_key is not None
        return best_key

    def describe(self) -> dict[str, object]:
        meta = self.model.meta
        return {
            "name": self.name,
            "trace": meta.get("trace"),
            "trace_fingerprint": meta.get("trace_fingerprint"),
            "heldout_sequences": meta.get("heldout_sequences"),
        }
