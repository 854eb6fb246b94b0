"""FlashMoE learned eviction (Kim et al., arXiv 2601.17063), as POLICIES.md describes it.

Per layer, a small network (see `harness.cache.learned`) predicts each expert's normalised distance to
its next use from recency and frequency after the current step is routed; on a miss with a full cache
the candidate with the largest prediction leaves. It needs only the step's accesses, so the live engine
runs it as well as the simulator. Spec: `flashmoe:PATH` (a model file from `harness policy train`).

Its decisions are compiled kernels (`harness.cache.compiled`) over rows for every (layer, expert) the
model has, bound in that order when the policy is built (a key outside the model is refused). The float globals
hold per layer the network's weights (`LayerNet.flat`, float32) and its last prediction (float32), valid while
the layer's step clock in the int globals says so (an access to the layer clears it); its experts' last uses and
access counts (contiguous, indexed by row: the recency loop vectorises); and per layer W1's frequency half
times the counts (`add_frequency`) and the largest count, updated at each access, so that a prediction reads
only W1's recency half. The network runs once per layer step that evicts, whatever the number of victims (they
all read that prediction), as the paper's per-step inference. The live engine's hooks and the simulator's
compiled replay call the same kernels.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import ClassVar

import numpy as np

from harness.cache.compiled import ACCESS_SIG, FIRST_COLUMN, STATE, VICTIM_SIG, BoundRows, CompiledPolicy, Kernel
from harness.cache.jit import KERNEL, njit
from harness.cache.learned import FlashMoEModel, add_frequency, network, recency_into, scratch_floats
from harness.cache.registry import register_policy
from harness.errors import HarnessError
from harness.keys import ExpertKey

try:
    from numba import types
except ImportError:  # njit is the identity (harness.cache.jit)
    types = None  # type: ignore[assignment]

LAYER_INDEX = FIRST_COLUMN
"""Int key column: the position of the key's layer among the model's layers."""
EXPERTS, BLOCK, HIDDEN, PREDICTIONS, LAST, FREQ, SUMS, TOPS, SCRATCH, PREDICTED = range(10)
"""Int globals: experts per layer, the float32 values of one layer's weights (`block_floats`, rounded up to
even), the network's hidden width; where the predictions (float32, one per row) start among the float32 values
of `gf`; where in `gf` (float64) the last uses (-1: none) and the access counts (one per row each), the frequency
sums (`add_frequency`, HIDDEN per layer) and the largest count (one per layer) start; where the network's
scratch starts among the float32 values; then per layer the step its prediction is for (_STALE: none)."""
_STALE = -(1 << 62)
PREDICT_SIG = types.none(*STATE, types.int64, types.int64) if types else None


@njit(**KERNEL, inline="always")
def _weights(g: np.ndarray, gf: np.ndarray, layer: int) -> np.ndarray:
    """The layer's network weights (`LayerNet.flat`, float32) in `gf`."""
    return gf.view(np.float32)[layer * g[BLOCK] : (layer + 1) * g[BLOCK]]


@njit(**KERNEL, inline="always")
def _sums(g: np.ndarray, gf: np.ndarray, layer: int) -> np.ndarray:
    """The layer's frequency sums (`add_frequency`, float64) in `gf`."""
    return gf[g[SUMS] + layer * g[HIDDEN] : g[SUMS] + (layer + 1) * g[HIDDEN]]


@njit(PREDICT_SIG, **KERNEL)
def _predict(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, layer: int, now: int) -> None:
    """The layer's prediction at step `now` (`FlashMoE.globals_` lays out `gf`)."""
    e, scratch = g[EXPERTS], g[SCRATCH]
    first = layer * e  # the layer's rows: its experts in order
    floats = gf.view(np.float32)
    recency = floats[scratch : scratch + e]
    recency_into(gf[g[LAST] + first : g[LAST] + first + e], now, recency)
    out = floats[g[PREDICTIONS] + first : g[PREDICTIONS] + first + e]
    top = max(gf[g[TOPS] + layer], 1.0)  # no use yet: the sums are 0
    network(_weights(g, gf, layer), recency, _sums(g, gf, layer), top, out, floats[scratch + e :])
    g[PREDICTED + layer] = now


@njit(ACCESS_SIG, **KERNEL)
def _access(g: np.ndarray, gf: np.ndarray, ki: np.ndarray, kf: np.ndarray, key: int, now: int, hit: bool) -> None:
    """The key's use: its last use and count, its layer's frequency sums and largest count; the layer's
    prediction is out of date."""
    e, layer = g[EXPERTS], ki[key, LAYER_INDEX]
    gf[g[LAST] + key] = now
    count = gf[g[FREQ] + key] + 1.0
    gf[g[FREQ] + key] = count
    gf[g[TOPS] + layer] = max(gf[g[TOPS] + layer], count)
    add_frequency(_weights(g, gf, layer), e, g[HIDDEN], key - layer * e, 1.0, _sums(g, gf, layer))
    g[PREDICTED + layer] = _STALE


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
    every (layer, expert) of the model in order (`FlashMoE.__init__`): row `key` is the model's layer index * E +
    expert, so the larger key is the larger row. The maximum is taken over (prediction, key) packed in one
    integer, the prediction's float32 bits above the key, without a branch: a prediction is never negative, so
    its bits are ordered as its value, and which of two candidates is larger is a coin toss that a branch would
    mispredict half the time (about 3x the scan's time at 32 slots)."""
    bits = gf.view(np.int32)
    predictions = g[PREDICTIONS]
    best = -1
    for key in resident:
        row = max(key, 0)  # a free slot (-1) reads row 0, and never wins
        candidate = (key >= 0) & (mark[row] != tag)
        layer = ki[row, LAYER_INDEX]
        if g[PREDICTED + layer] != now and candidate:  # the first test rarely holds: it comes first
            _predict(g, gf, ki, kf, layer, now)
        ranked = (np.int64(bits[predictions + row]) << 32) | row
        best = max(best, ranked if candidate else -1)
    return best & 0xFFFFFFFF if best >= 0 else -1


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
        e, hidden, weights, n = self.model.num_experts, self.model.hidden, self.model.packed, len(self.layers)
        # After the weights (float32 values, two a word): the predictions (float32), the last uses (-1: none) and
        # counts (n * e each), the frequency sums (n * hidden) and largest counts (n), then the scratch (float32).
        last = len(weights) + (n * e + 1) // 2
        freq = last + n * e
        sums = freq + n * e
        tops = sums + n * hidden
        scratch = 2 * (tops + n)
        gf = np.zeros((scratch + e + scratch_floats(hidden) + 1) // 2)
        gf[: len(weights)] = weights
        gf[last:freq] = -1.0
        ints = [e, 2 * len(weights) // n, hidden, 2 * len(weights), last, freq, sums, tops, scratch]
        return ints + [_STALE] * n, gf

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
