"""FlashMoE-style learned eviction (POLICIES.md): features, the per-layer network, its model file, training.

Per MoE layer, one small MLP reads the layer's state after the current step has been routed,
`x = concat(1/rec, freq / max(freq))` (rec = token steps since the expert's last use, 1 when used at
this step; freq = its accesses so far) and predicts each expert's normalised distance to its next use,
`(clamp(d, 1, D) - 1) / (D - 1)` with d the Belady next-use distance in steps (never used again: D).
Cold start: an expert never used yet has recency feature 0 and frequency 0.

Inference is compiled (`features` and `mlp`, numba as in `harness.cache.ranked`; no torch in the live
engine's hot path): the same functions build the training samples, score in the policy's kernel
(`harness.cache.policies.flashmoe`) and back `LayerNet.predict`. torch is used only to train. The model
file is `torch.save` of a dict: format tag, metadata, and per layer the weight arrays as tensors (loadable
with `weights_only=True`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np

from harness.cache.ranked import njit
from harness.errors import HarnessError

try:
    from numba import types
except ImportError:  # njit is the identity (ranked.py)
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


@njit(types.float32[::1](types.int64[:], types.float64[:], types.int64) if types else None, cache=True)
def features(last: np.ndarray, freq: np.ndarray, now: int) -> np.ndarray:
    """[2E] float32 features of one layer at step `now`; `last` is -1 for experts never used."""
    e = len(last)
    x = np.zeros(2 * e, dtype=np.float32)
    top = freq.max()
    for i in range(e):
        if last[i] >= 0:
            x[i] = 1.0 / max(now - last[i] + 1, 1)
        if top > 0:
            x[e + i] = freq[i] / top
    return x


@njit(cache=True)
def _dense(wt: np.ndarray, b: np.ndarray, x: np.ndarray, silu: bool) -> np.ndarray:
    """`W @ x + b` (then SiLU) with W given transposed, [in, out] flattened: each output sums its inputs in
    order, and the inner loop runs over contiguous outputs."""
    n_out = len(b)
    y = np.zeros(n_out)
    for j in range(len(x)):
        xj = x[j]
        column = wt[j * n_out : j * n_out + n_out]
        for i in range(n_out):
            y[i] += column[i] * xj
    for i in range(n_out):
        y[i] = y[i] + b[i]
        if silu:
            y[i] = y[i] / (1.0 + math.exp(-y[i]))
    return y


_VEC: Any = types.float64[::1] if types else None


@njit(
    types.float64[::1](_VEC, _VEC, _VEC, _VEC, _VEC, _VEC, types.float32[:]) if types else None,
    cache=True,
)
def mlp(
    wt1: np.ndarray, b1: np.ndarray, wt2: np.ndarray, b2: np.ndarray, wt3: np.ndarray, b3: np.ndarray, x: np.ndarray
) -> np.ndarray:
    """One layer's network on features `x`: |W3 SiLU(W2 SiLU(W1 x + b1) + b2) + b3|, weights transposed
    (`LayerNet.transposed`)."""
    h = _dense(wt1, b1, x.astype(np.float64), True)
    h = _dense(wt2, b2, h, True)
    return np.abs(_dense(wt3, b3, h, False))


@dataclass
class LayerNet:
    """One layer's weights as numpy arrays: w [out, in], b [out] (torch Linear layout)."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    w3: np.ndarray
    b3: np.ndarray

    def transposed(self) -> list[np.ndarray]:
        """The weights as `mlp` takes them: each W transposed and flattened, each b as it is."""
        return [
            np.ascontiguousarray(a.T).ravel() if a.ndim == 2 else a
            for a in (self.w1, self.b1, self.w2, self.b2, self.w3, self.b3)
        ]

    def predict(self, x: np.ndarray) -> np.ndarray:
        network: Any = mlp  # numba's Dispatcher: its stub does not know the compiled signature
        return cast(np.ndarray, network(*self.transposed(), np.asarray(x, dtype=np.float32)))


@dataclass
class FlashMoEModel:
    meta: dict[str, object]
    nets: dict[int, LayerNet]

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])  # type: ignore[call-overload]

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
