"""FlashMoE learned eviction (Kim et al., arXiv 2601.17063), as POLICIES.md describes it.

Per layer, a small network (see `harness.cache.learned`) predicts each expert's normalised distance to
its next use from recency and frequency after the current step is routed; on a miss with a full cache
the candidate with the largest prediction leaves. It needs only the step's accesses, so the live engine
runs it as well as the simulator. Spec: `flashmoe:PATH` (a model file from `harness policy train`).

Its decisions are compiled kernels (`harness.cache.compiled`) over rows for every (layer, expert) the
model has, bound in that order when the policy is built (a key outside the model is refused): per key its
last use and access count; per layer, in the float globals, the network's weights (`LayerNet.transposed`)
and its last prediction, valid while the layer's step clock in the int globals says so (an access to the
layer clears it). The live engine's hooks and the simulator's compiled replay call the same kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from harness.cache.compiled import ACCESS_SIG, EXPERT, FIRST_COLUMN, LAYER, STATE, VICTIM_SIG, CompiledPolicy, Kernel
from harness.cache.learned import FlashMoEModel, features, mlp
from harness.cache.ranked import njit
from harness.cache.registry import register_policy
from harness.errors import HarnessError
from harness.keys import ExpertKey

try:
    from numba import types
except ImportError:  # njit is the identity (ranked.py)
    types = None  # type: ignore[assignment]

LAST, LAYER_INDEX = FIRST_COLUMN, FIRST_COLUMN + 1
"""Int key columns: the last access (-1: none), the position of the key's layer among the model's layers."""
FREQ = 0
"""Float key column: accesses so far."""
EXPERTS, HIDDEN, PREDICTED = 0, 1, 2
"""Int globals: experts per layer, hidden width, then per layer the step its prediction is for (_STALE: none)."""
_STALE = -(1 << 62)
PREDICT_SIG = types.none(*STATE, types.int64, types.int64) if types else None


@njit(cache=True)
def _sizes(g: np.ndarray) -> tuple[int, int, int]:
    """Experts, hidden width and the floats of one layer's block in `gf` (weights, then the prediction)."""
    e, h = g[EXPERTS], g[HIDDEN]
    return e, h, 2 * e * h + h + h * h + h + h * e + e + e


@njit(PREDICT_SIG, cache=True)
def _predict(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, layer: int, now: int) -> None:
    """The layer's prediction at step `now`, unless it holds one already."""
    if g[PREDICTED + layer] == now:
        return
    e, h, block = _sizes(g)
    first = layer * e  # the layer's rows: its experts in order
    x = features(ki[first : first + e, LAST].copy(), kf[first : first + e, FREQ].copy(), now)
    at = layer * block
    ends = np.cumsum(np.array([at, 2 * e * h, h, h * h, h, h * e, e, e]))
    pred = mlp(
        gf[ends[0] : ends[1]],
        gf[ends[1] : ends[2]],
        gf[ends[2] : ends[3]],
        gf[ends[3] : ends[4]],
        gf[ends[4] : ends[5]],
        gf[ends[5] : ends[6]],
        x,
    )
    gf[ends[6] : ends[7]] = pred
    g[PREDICTED + layer] = now


@njit(ACCESS_SIG, cache=True)
def _access(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int, hit: bool) -> None:
    ki[key, LAST] = now
    kf[key, FREQ] += 1.0
    g[PREDICTED + ki[key, LAYER_INDEX]] = _STALE


@njit(VICTIM_SIG, cache=True)
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
    """The candidate with the largest predicted distance to its next use; ties to the larger key."""
    e, _, block = _sizes(g)
    best, best_score = -1, 0.0
    for key in resident:
        if key >= 0 and mark[key] != tag:
            layer = ki[key, LAYER_INDEX]
            _predict(g, gf, ki, kf, layer, now)
            score = gf[layer * block + block - e + ki[key, EXPERT]]
            if best < 0 or (score, ki[key, LAYER], ki[key, EXPERT]) > (best_score, ki[best, LAYER], ki[best, EXPERT]):
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
    int_columns = (-1, 0)
    float_columns = (0.0,)

    def __init__(self, capacity: int, seed: int = 0, model: FlashMoEModel | None = None) -> None:
        if model is None:
            raise HarnessError("flashmoe needs a model: flashmoe:PATH (train one with `harness policy train`)")
        self.model = model
        self.layers = sorted(model.nets)
        super().__init__(capacity, seed)
        super().bind([(layer, e) for layer in self.layers for e in range(model.num_experts)])

    def globals_(self) -> tuple[list[int], np.ndarray]:
        e, nets = self.model.num_experts, [self.model.nets[layer] for layer in self.layers]
        hidden = nets[0].b1.shape[0]
        blocks = [np.concatenate([*net.transposed(), np.zeros(e)]) for net in nets]
        return [e, hidden] + [_STALE] * len(nets), np.concatenate(blocks)

    def new_rows(self, keys: Sequence[ExpertKey]) -> tuple[np.ndarray, np.ndarray]:
        ki, kf = super().new_rows(list(keys))
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
