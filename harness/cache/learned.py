"""FlashMoE-style learned eviction (POLICIES.md): features, the per-layer network, its model file, training.

Per MoE layer, one small MLP reads the layer's state after the current step has been routed,
`x = concat(1/rec, freq / max(freq))` (rec = token steps since the expert's last use, 1 when used at
this step; freq = its accesses so far) and predicts each expert's normalised distance to its next use,
`(clamp(d, 1, D) - 1) / (D - 1)` with d the Belady next-use distance in steps (never used again: D).
Cold start: an expert never used yet has recency feature 0 and frequency 0.

Inference is compiled (numba: `harness.cache.jit`; no torch in the live engine's hot path). `features` builds
the training samples; `network` scores, in the policy's kernel (`harness.cache.policies.flashmoe`) and in
`LayerNet.predict` (`mlp`). The kernel keeps W1's frequency half times the access counts up to date a use at a
time (`add_frequency`, float64) and divides it by the largest count at a prediction, so that a prediction reads
W1's recency half only; `mlp` sums the same product from the features. torch is used only to train. The network
runs in float32, the precision torch trains it in (twice the SIMD width of float64, and the replay's cost), its
SiLU too, with a branch-free exp (`harness.cache.vmath.expf`) so that it vectorises, where libm's is one scalar
call per value. The model file is `torch.save` of a dict: format tag, metadata, and per layer the weight arrays
as tensors (loadable with `weights_only=True`).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from harness.cache.jit import KERNEL, njit
from harness.cache.vmath import expf
from harness.errors import HarnessError

try:
    from numba import types
except ImportError:  # njit is the identity (harness.cache.jit)
    types = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

MODEL_FORMAT = "harness-flashmoe"
MODEL_VERSION = 1
HIDDEN = 64
"""Width of both hidden layers (POLICIES.md: Linear(2E, 64) - SiLU - Linear(64, 64) - SiLU - Linear(64, E))."""
DISTANCE_FRACTION = 0.75
"""D = round(0.75 E): the distance cap of the labels (48 for 64 experts, 96 for 128; the paper quotes 98)."""


def distance_cap(num_experts: int) -> int:
    return max(2, round(DISTANCE_FRACTION * num_experts))


_ROW: Any = types.float64[::1] if types else None
_VECTOR: Any = types.float32[::1] if types else None


@njit(types.none(_ROW, types.int64, _VECTOR) if types else None, cache=True, error_model="numpy")
def recency_into(last: np.ndarray, now: int, x: np.ndarray) -> None:
    """The [E] recency features of one layer at step `now` into `x`: 1 / rec, 0 for an expert never used
    (`last` -1). Contiguous float inputs and no branch, so that the loop vectorises (AVX2 converts no int64 to
    float); the values are those of integer last uses (every step below 2^53 is exact in float64). numpy's error
    model: no ZeroDivisionError test (the divisor is at least 1)."""
    for i in range(len(last)):
        x[i] = 1.0 / max(now - last[i] + 1.0, 1.0) if last[i] >= 0 else 0.0


@njit(types.none(_ROW, _ROW, types.int64, _VECTOR) if types else None, cache=True, error_model="numpy")
def features_into(last: np.ndarray, freq: np.ndarray, now: int, x: np.ndarray) -> None:
    """Write the [2E] features of one layer at step `now` into `x`: `recency_into`, then freq / max(freq)."""
    e = len(last)
    recency_into(last, now, x[:e])
    top = freq.max()
    for i in range(e):
        x[e + i] = freq[i] / top if top > 0 else 0.0


@njit(types.float32[::1](types.int64[:], types.float64[:], types.int64) if types else None, cache=True)
def features(last: np.ndarray, freq: np.ndarray, now: int) -> np.ndarray:
    """[2E] float32 features of one layer at step `now` (`features_into`) from integer last uses."""
    x = np.empty(2 * len(last), dtype=np.float32)
    features_into(last.astype(np.float64), np.ascontiguousarray(freq), now, x)
    return x


def block_floats(num_experts: int, hidden: int) -> int:
    """float32 values of one layer's network as `mlp` reads them (`LayerNet.flat`)."""
    return 2 * num_experts * hidden + hidden + hidden * hidden + hidden + hidden * num_experts + num_experts


@njit(cache=True, error_model="numpy")  # no ZeroDivisionError test (1 + exp >= 1): the loop vectorises
def _silu(y: np.ndarray) -> None:
    """y <- y / (1 + exp(-y)) in float32, as torch computes it. Beyond the clamp of `expf`, y > 87 gives y
    (as exp's underflow does) and y < -88 about 1e-37 (where an overflowing exp gives -0)."""
    for i in range(len(y)):
        y[i] = y[i] / (np.float32(1.0) + expf(-y[i]))


@njit(cache=True)
def _product(w: np.ndarray, at: int, x: np.ndarray, y: np.ndarray) -> int:
    """y = `W @ x` for the W (transposed, [in, out] flattened) at w[at:], the sizes those of x and y; returns
    where W ends. The inputs are summed in order, four at a time (y += w_j x_j + ... + w_j+3 x_j+3), over
    contiguous outputs: SIMD loops that keep y in memory a quarter as often as one input at a time would."""
    n_in, n_out = len(x), len(y)
    y[:] = 0.0
    quads = n_in - n_in % 4
    for j in range(0, quads, 4):
        x0, x1, x2, x3 = x[j], x[j + 1], x[j + 2], x[j + 3]
        c = at + j * n_out
        c0, c1 = w[c : c + n_out], w[c + n_out : c + 2 * n_out]
        c2, c3 = w[c + 2 * n_out : c + 3 * n_out], w[c + 3 * n_out : c + 4 * n_out]
        for i in range(n_out):
            y[i] += c0[i] * x0 + c1[i] * x1 + c2[i] * x2 + c3[i] * x3
    for j in range(quads, n_in):
        xj = x[j]
        column = w[at + j * n_out : at + j * n_out + n_out]
        for i in range(n_out):
            y[i] += column[i] * xj
    return at + n_in * n_out


@njit(cache=True)
def _dense(w: np.ndarray, at: int, x: np.ndarray, y: np.ndarray) -> int:
    """y = `W @ x + b` (`_product`, then the bias that follows W); returns where the next layer's weights start."""
    at = _product(w, at, x, y)
    for i in range(len(y)):
        y[i] = y[i] + w[at + i]
    return at + len(y)


_ADD_SIG: Any = types.none(_VECTOR, types.int64, types.int64, types.int64, types.float64, _ROW) if types else None
_NETWORK_SIG: Any = types.none(_VECTOR, _VECTOR, _ROW, types.float64, _VECTOR, _VECTOR) if types else None


@njit(_ADD_SIG, **KERNEL, inline="always")
def add_frequency(w: np.ndarray, num_experts: int, hidden: int, expert: int, amount: float, sums: np.ndarray) -> None:
    """sums += amount * W1's column of `expert`'s frequency feature (float64): W1's frequency half times the counts
    of experts' uses, kept up to date by the policy a use at a time (`network` divides it by the largest count)."""
    column = w[(num_experts + expert) * hidden : (num_experts + expert + 1) * hidden]
    for i in range(hidden):
        sums[i] += amount * column[i]


@njit(_NETWORK_SIG, **KERNEL)
def network(
    w: np.ndarray, recency: np.ndarray, sums: np.ndarray, top: float, out: np.ndarray, scratch: np.ndarray
) -> None:
    """One layer's network into `out`: |W3 SiLU(W2 SiLU(W1 x + b1) + b2) + b3| with x = (recency, freq / top), in
    float32 (the precision it is trained in) but for W1's frequency half, given as `sums` (`add_frequency`: the
    frequencies times their columns, float64) and divided by `top`; the weights `LayerNet.flat` at the start of
    `w`; `scratch` holds the hidden width twice (`scratch_floats`). The policy keeps `sums` up to date a use at a
    time, so that a prediction reads W1's recency half only: a quarter less of the weights, which come from L2 or
    L3 (every layer's network is 8 x 66 KB with 64 experts), the network's bound."""
    e, hidden = len(out), len(scratch) // 2
    h1, h2 = scratch[:hidden], scratch[hidden:]
    at = _product(w, 0, recency, h1) + e * hidden  # past W1's frequency half: b1
    for i in range(hidden):
        h1[i] = (h1[i] + np.float32(sums[i] / top)) + w[at + i]
    _silu(h1)
    at = _dense(w, at + hidden, h1, h2)
    _silu(h2)
    _dense(w, at, h2, out)
    for i in range(e):
        out[i] = abs(out[i])


@njit(types.none(_VECTOR, _VECTOR, _VECTOR, _VECTOR) if types else None, cache=True)
def mlp(w: np.ndarray, x: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    """One layer's network on features `x` (`features_into`) into `out`: `network` with W1's frequency half
    summed from the features (`add_frequency`, top 1)."""
    e, hidden = len(out), len(scratch) // 2
    sums = np.zeros(hidden)
    for expert in range(e):
        add_frequency(w, e, hidden, expert, float(x[e + expert]), sums)
    network(w, x[:e], sums, 1.0, out, scratch)


def scratch_floats(hidden: int) -> int:
    """The float32 values of `mlp`'s scratch."""
    return 2 * hidden


@dataclass
class LayerNet:
    """One layer's weights as numpy arrays: w [out, in], b [out] (torch Linear layout)."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    w3: np.ndarray
    b3: np.ndarray

    def flat(self) -> np.ndarray:
        """The weights as `mlp` reads them, float32: W1 transposed and flattened, b1, then W2, b2, W3, b3 alike."""
        parts = [a.T.ravel() if a.ndim == 2 else a for a in (self.w1, self.b1, self.w2, self.b2, self.w3, self.b3)]
        return np.concatenate(parts).astype(np.float32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        e, hidden = self.w3.shape
        out = np.empty(e, dtype=np.float32)
        network: Any = mlp  # numba's Dispatcher: its stub does not know the compiled signature
        network(self.flat(), np.asarray(x, dtype=np.float32), out, np.empty(scratch_floats(hidden), np.float32))
        return out.astype(np.float64)


@dataclass
class FlashMoEModel:
    meta: dict[str, object]
    nets: dict[int, LayerNet]

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])  # type: ignore[call-overload]

    @property
    def hidden(self) -> int:
        return int(next(iter(self.nets.values())).b1.shape[0])

    @functools.cached_property
    def packed(self) -> np.ndarray:
        """Every layer's `LayerNet.flat`, in layer order, each padded to an even length, as float64 words of two
        float32 values: the flashmoe kernel's weights (`harness.cache.policies.flashmoe`), built once per model."""
        block = block_floats(self.num_experts, self.hidden)
        stride = block + block % 2
        words = np.zeros(len(self.nets) * stride, dtype=np.float32)
        for i, layer in enumerate(sorted(self.nets)):
            words[i * stride : i * stride + block] = self.nets[layer].flat()
        return words.view(np.float64)

    def save(self, path: Path) -> Path:
        import torch

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "meta": self.meta,
            "layers": {
                int(layer): {
                    name: torch.from_numpy(np.ascontiguousarray(getattr(net, name), dtype=np.float32))
                    for name in _PARAMS
                }
                for layer, net in self.nets.items()
            },
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(blob, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FlashMoEModel:
        import torch

        path = Path(path)
        if not path.is_file():
            raise HarnessError(f"FlashMoE model file {path} does not exist (train one with `harness policy train`)")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a file that is not a saved dict
            raise HarnessError(f"{path}: not a FlashMoE model file ({exc.__class__.__name__})") from None
        if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
            raise HarnessError(f"{path}: not a FlashMoE model file (format tag {MODEL_FORMAT!r} missing)")
        version = blob.get("version", 0)
        if not isinstance(version, int) or version > MODEL_VERSION:
            raise HarnessError(f"{path}: model file version {version!r} is not one this harness reads")
        meta = blob.get("meta")
        if not isinstance(meta, dict) or not isinstance(meta.get("num_experts"), int) or meta["num_experts"] < 1:
            raise HarnessError(f"{path}: FlashMoE model file without a valid meta.num_experts")
        num_experts = meta["num_experts"]
        layers = blob.get("layers")
        if not isinstance(layers, dict) or not layers:
            raise HarnessError(f"{path}: FlashMoE model file holds no layers")
        nets = {
            _layer_number(layer, path): _layer_net(params, num_experts, f"{path}: layer {layer}")
            for layer, params in layers.items()
        }
        return cls(meta=dict(meta), nets=nets)


_PARAMS = ("w1", "b1", "w2", "b2", "w3", "b3")


def _layer_number(layer: object, path: Path) -> int:
    try:
        return int(layer)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise HarnessError(f"{path}: layer key {layer!r} is not a layer number") from None


def _layer_net(params: object, num_experts: int, where: str) -> LayerNet:
    """One layer's parameters, checked: every array present, finite, of the MLP's shapes for E experts."""
    import torch

    if not isinstance(params, dict) or any(not isinstance(params.get(n), torch.Tensor) for n in _PARAMS):
        raise HarnessError(f"{where}: parameters {', '.join(_PARAMS)} expected as tensors")
    arrays = {name: params[name].numpy().astype(np.float64) for name in _PARAMS}
    hidden = arrays["w1"].shape[0] if arrays["w1"].ndim == 2 else -1
    expected = {
        "w1": (hidden, 2 * num_experts),
        "b1": (hidden,),
        "w2": (hidden, hidden),
        "b2": (hidden,),
        "w3": (num_experts, hidden),
        "b3": (num_experts,),
    }
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise HarnessError(f"{where}: {name} has shape {list(arrays[name].shape)}, expected {list(shape)}")
        if not np.isfinite(arrays[name]).all():
            raise HarnessError(f"{where}: {name} holds NaN or infinite values")
    return LayerNet(**arrays)


# ------------------------------------------------------------------------------------------- training


@dataclass
class TrainSettings:
    """Hyper-parameters (POLICIES.md defaults); recorded in the model file."""

    lr: float = 2e-3
    batch_size: int = 256
    max_epochs: int = 200
    patience: int = 5
    validation_fraction: float = 0.1
    """Share of the training samples (drawn with the seed) used only for early stopping."""
    heldout_fraction: float = 0.25
    """Share of the sequences (the last ones by seq_id) never seen in training: the evaluation set."""
    seed: int = 0


def layer_samples(steps: list[tuple[int, np.ndarray]], num_experts: int, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of one layer's stream of (now, distinct experts) steps, replayed from empty.

    Labels are Belady next-use distances strictly after each step, in token steps, clamped to [1, cap]
    and normalised to [0, 1]; an expert not used again gets the cap.
    """
    n = len(steps)
    xs = np.zeros((n, 2 * num_experts), dtype=np.float32)
    ys = np.zeros((n, num_experts), dtype=np.float32)
    last = np.full(num_experts, -1, dtype=np.int64)
    freq = np.zeros(num_experts, dtype=np.float64)
    for i, (now, experts) in enumerate(steps):
        last[experts] = now
        freq[experts] += 1
        xs[i] = features(last, freq, now)
    next_use = np.full(num_experts, np.inf)
    for i in range(n - 1, -1, -1):
        now, experts = steps[i]
        dist = np.minimum(next_use - now, cap)
        ys[i] = (np.clip(dist, 1, cap) - 1) / (cap - 1)
        next_use[experts] = now
    return xs, ys


def fit_layer(xs: np.ndarray, ys: np.ndarray, settings: TrainSettings, seed: int) -> tuple[LayerNet, dict]:
    """MSE, AdamW, mini-batches, early stopping on a seeded validation share of the samples."""
    import torch

    torch.manual_seed(seed)
    # One thread: the matrices are tiny (2E x 64), threads only add synchronisation, and a shared
    # 2-core machine slowed training 20-fold with the default of one thread per core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(xs, ys, settings, seed)
    finally:
        torch.set_num_threads(threads)


def _fit(xs: np.ndarray, ys: np.ndarray, settings: TrainSettings, seed: int) -> tuple[LayerNet, dict]:
    import torch
    from torch import nn

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(xs))
    n_val = max(1, int(len(xs) * settings.validation_fraction))
    val, train = order[:n_val], order[n_val:]
    if len(train) == 0:
        raise HarnessError("too few training steps for a FlashMoE network: record a longer trace")
    e2, e = xs.shape[1], ys.shape[1]
    net = nn.Sequential(nn.Linear(e2, HIDDEN), nn.SiLU(), nn.Linear(HIDDEN, HIDDEN), nn.SiLU(), nn.Linear(HIDDEN, e))
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr)
    x_tr, y_tr = torch.from_numpy(xs[train]), torch.from_numpy(ys[train])
    x_val, y_val = torch.from_numpy(xs[val]), torch.from_numpy(ys[val])
    best, best_state, stale, epochs = math.inf, None, 0, 0
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(settings.max_epochs):
        net.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        for start in range(0, len(perm), settings.batch_size):
            idx = perm[start : start + settings.batch_size]
            loss = nn.functional.mse_loss(net(x_tr[idx]).abs(), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            val_loss = nn.functional.mse_loss(net(x_val).abs(), y_val).item()
        epochs = epoch + 1
        if val_loss < best - 1e-7:
            best, stale = val_loss, 0
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            stale += 1
            if stale >= settings.patience:
                break
    assert best_state is not None
    w = [best_state[f"{i}.weight"].numpy().astype(np.float64) for i in (0, 2, 4)]
    b = [best_state[f"{i}.bias"].numpy().astype(np.float64) for i in (0, 2, 4)]
    layer_net = LayerNet(w[0], b[0], w[1], b[1], w[2], b[2])
    return layer_net, {"epochs": epochs, "val_mse": best, "train_samples": len(train), "val_samples": len(val)}


def split_sequences(seq_ids: list[int], heldout_fraction: float) -> tuple[list[int], list[int]]:
    """(train, held-out): the last ceil(fraction * n) sequences by seq_id are held out."""
    ids = sorted(seq_ids)
    if len(ids) < 2:
        raise HarnessError(
            "training needs at least 2 sequences (one to train on, one held out); "
            "for an imported stream, split it with --sequence-length"
        )
    n_out = min(len(ids) - 1, max(1, math.ceil(len(ids) * heldout_fraction)))
    return ids[:-n_out], ids[-n_out:]


def build_model(
    layer_streams: dict[int, list[list[tuple[int, np.ndarray]]]],
    num_experts: int,
    settings: TrainSettings,
    meta: dict[str, object],
) -> FlashMoEModel:
    """Train one network per layer from its training streams (one per training sequence)."""
    cap = distance_cap(num_experts)
    nets: dict[int, LayerNet] = {}
    stats: dict[str, dict] = {}
    for i, (layer, streams) in enumerate(sorted(layer_streams.items())):
        parts = [layer_samples(steps, num_experts, cap) for steps in streams if steps]
        xs = np.concatenate([p[0] for p in parts])
        ys = np.concatenate([p[1] for p in parts])
        nets[layer], stats[str(layer)] = fit_layer(xs, ys, settings, settings.seed + i)
        log.info("layer %d: %s", layer, stats[str(layer)])
    full_meta = {
        **meta,
        "num_experts": num_experts,
        "distance_cap": cap,
        "layers": sorted(layer_streams),
        "hidden": HIDDEN,
        "features": "concat(1/rec, freq/max(freq)); never used: 0, 0",
        "labels": "Belady next-use distance in token steps, clamp [1, D], (d-1)/(D-1)",
        "settings": vars(settings),
        "fit": stats,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return FlashMoEModel(meta=full_meta, nets=nets)
