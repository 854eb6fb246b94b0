"""FlashMoE learned eviction (Kim et al., arXiv 2601.17063), as POLICIES.md describes it.

Per layer, a small network (see `harness.cache.learned`) predicts each expert's normalised distance to
its next use from recency and frequency after the current step is routed; on a miss with a full cache
the candidate with the largest prediction leaves. It needs only the step's accesses, so the live engine
runs it as well as the simulator. Spec: `flashmoe:PATH` (a model file from `harness policy train`).

Its decisions are compiled kernels (`harness.cache.compiled`) over rows for every (layer, expert) the
model has, bound in that order when the policy is built (a key outside the model is refused). The float globals
hold per layer the network's weights (`LayerNet.flat`, float32), its last prediction, valid while the layer's
step clock in the int globals says so (an access to the layer clears it), and its experts' last uses and access
counts (contiguous, indexed by row: the features' loop vectorises). The network runs once per layer step that
evicts, whatever the number of victims (they all read that prediction), as the paper's per-step inference. The
live engine's hooks and the simulator's compiled replay call the same kernels.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import ClassVar

import numpy as np

from harness.cache.compiled import ACCESS_SIG, FIRST_COLUMN, STATE, VICTIM_SIG, BoundRows, CompiledPolicy, Kernel
from harness.cache.jit import KERNEL, njit
from harness.cache.learned import FlashMoEModel, features_into, mlp, scratch_floats
from harness.cache.registry import register_policy
from harness.errors import HarnessError
from harness.keys import ExpertKey

try:
    from numba import types
except ImportError:  # njit is the identity (harness.cache.jit)
    types = None  # type: ignore[assignment]

LAYER_INDEX = FIRST_COLUMN
"""Int key column: the position of the key's layer among the model's layers."""
EXPERTS, BLOCK, PREDICTIONS, LAST, FREQ, SCRATCH, PREDICTED = range(7)
"""Int globals: experts per layer, the float32 values of one layer's weights (`block_floats`, rounded up to
even), where in `gf` the predictions, the last uses (-1: none) and the access counts start (one per row each),
where the network's scratch starts among the float32 values of `gf`, then per layer the step its prediction is
for (_STALE: none)."""
_STALE = -(1 << 62)
PREDICT_SIG = types.none(*STATE, types.int64, types.int64) if types else None


@njit(PREDICT_SIG, **KERNEL)
def _predict(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, layer: int, now: int) -> None:
    """The layer's prediction at step `now`, unless it holds one already. `gf` holds, as float32 values, every
    layer's weights, then (as float64) the predictions, E per layer, then (float32) the features and the
    network's scratch (`FlashMoE.globals_`)."""
    if g[PREDICTED + layer] == now:
        return
    e, block, scratch = g[EXPERTS], g[BLOCK], g[SCRATCH]
    first = layer * e  # the layer's rows: its experts in order
    floats = gf.view(np.float32)
    x = floats[scratch : scratch + 2 * e]
    last, freq = gf[g[LAST] + first : g[LAST] + first + e], gf[g[FREQ] + first : g[FREQ] + first + e]
    features_into(last, freq, now, x)
    at = g[PREDICTIONS] + first
    mlp(floats[layer * block : (layer + 1) * block], x, gf[at : at + e], floats[scratch + 2 * e :])
    g[PREDICTED + layer] = now


@njit(ACCESS_SIG, **KERNEL)
def _access(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int, hit: bool) -> None:
    gf[g[LAST] + key] = now
    gf[g[FREQ] + key] += 1.0
    g[PREDICTED + ki[key, LAYER_INDEX]] = _STALE


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
    """The candidate with the largest predicted distance to its next use; ties to the larger key. The rows are
    every (layer, expert) of the model in order (`FlashMoE.__init__`): row `key` is the model's
    layer index * E + expert, so its prediction is at predictions + key and the larger key is the larger row."""
    best, best_score = -1, 0.0
    predictions = g[PREDICTIONS]
    for key in resident:
        if key >= 0 and mark[key] != tag:
            layer = ki[key, LAYER_INDEX]
            if g[PREDICTED + layer] != now:  # `_predict`'s own test, here to skip a call per candidate
                _predict(g, gf, ki, kf, layer, now)
            score = gf[predictions + key]
            if best < 0 or score > best_score or (score == best_score and key > best):
                best, best_score = key, score
    return best


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
class FlashMoE(CompiledPolicy):
    name = "flashmoe"
    kernel = Kernel(access=_access, victim=_victim)
    int_columns = (0,)
    _bound: ClassVar[tuple[FlashMoEModel, BoundRows] | None] = None
    """The model last built on and the rows its keys got: the simulator builds a policy per layer and capacity on
    one model, and binding its keys is most of a policy's construction."""

    def __init__(self, capacity: int, seed: int = 0, model: FlashMoEModel | None = None) -> None:
        if model is None:
            raise HarnessError("flashmoe needs a model: flashmoe:PATH (train one with `harness policy train`)")
        self.model = model
        self.layers = sorted(model.nets)
        super().__init__(capacity, seed)
        bound = FlashMoE._bound
        if bound is None or bound[0] is not model:
            super().bind([(layer, e) for layer in self.layers for e in range(model.num_experts)])
            FlashMoE._bound = (model, self.rows())
        else:  # the rows of the model's keys as the last policy built on it bound them (the same every time)
            self.adopt_rows(bound[1])

    def globals_(self) -> tuple[list[int], np.ndarray]:
        e, weights, n = self.model.num_experts, self.model.packed, len(self.layers)
        scratch = 2 * e + scratch_floats(e, self.model.hidden)
        # After the weights: predictions, last uses (-1: none) and counts, n * e each, then the scratch.
        rows = np.zeros((3, n * e))
        rows[1] = -1.0
        predictions, last, freq, end = (len(weights) + i * n * e for i in range(4))
        ints = [e, 2 * len(weights) // n, predictions, last, freq, 2 * end] + [_STALE] * n
        return ints, np.concatenate([weights, rows.ravel(), np.zeros((scratch + 1) // 2)])

    def new_rows(self, keys: list[ExpertKey]) -> tuple[np.ndarray, np.ndarray]:
        ki, kf = super().new_rows(keys)
        position = {layer: i for i, layer in enumerate(self.layers)}
        ki[:, LAYER_INDEX] = [position[layer] for layer, _ in keys]
        return ki, kf

    def bind(self, keys: list[ExpertKey]) -> np.ndarray:
        """Rows of `keys`, all bound when the policy was built: a key outside the model is refused."""
        for layer, expert in keys:
            if (layer, expert) not in self.index:
                if layer not in self.model.nets:
                    raise HarnessError(f"the FlashMoE model has no network for layer {layer} (it has {self.layers})")
                raise HarnessError(f"expert {expert} is outside the FlashMoE model's {self.model.num_experts} experts")
        return super().bind(keys)

    def reset(self) -> None:
        self.__init__(self.capacity, self.seed, self.model)  # type: ignore[misc]

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

    def describe(self) -> dict[str, object]:
        meta = self.model.meta
        return {
            "name": self.name,
            "trace": meta.get("trace"),
            "trace_fingerprint": meta.get("trace_fingerprint"),
            "heldout_sequences": meta.get("heldout_sequences"),
        }
