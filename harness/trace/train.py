"""`harness policy train`: FlashMoE networks from a routing trace, evaluated on held-out sequences only.

The trace is split by the held-out protocol of `harness.trace.split` (`--split seq:N` or `frac:F`; by
default the last ones by seq_id are held out, or the last share of the token steps for a single-stream
trace such as an imported vLLM log); each training sequence (part) is replayed from an empty state to
produce features and Belady labels (`harness.cache.learned`); the model is then replayed on the held-out
part beside LRU, LFU and Belady, at each requested capacity, per-layer scope, a fresh cache per sequence
(part). The README explains why
only held-out numbers are honest: with recency and frequency inputs the network memorises positions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.cache.learned import FlashMoEModel, TrainSettings, build_model, split_sequences
from harness.trace.schema import read_trace
from harness.trace.simulate import PhaseFilter, Replay, build_replay, parse_capacities, run_replay, trace_fingerprint
from harness.trace.split import Split, parse_split, split_trace

log = logging.getLogger(__name__)

BASELINES = ("lru", "lfu", "belady")


@dataclass
class TrainReport:
    model_path: Path
    model: FlashMoEModel
    train_sequences: list[int]
    heldout_sequences: list[int]
    split: str
    rows: list[dict[str, object]] = field(default_factory=list)
    """Held-out evaluation: policy, capacity_slots, capacity_pct, hits, misses, hit_rate."""


def layer_streams(replay: Replay) -> dict[int, list[list[tuple[int, np.ndarray]]]]:
    """Per layer, each stream's (now, distinct experts) steps: what `build_model` trains on."""
    streams: dict[int, list[list[tuple[int, np.ndarray]]]] = {layer: [] for layer in replay.layers}
    for stream in replay.streams:
        per_layer: dict[int, list[tuple[int, np.ndarray]]] = {layer: [] for layer in replay.layers}
        for layer, keys, now, _ in stream.calls:
            per_layer[layer].append((now, np.fromiter((e for _, e in keys), dtype=np.int64, count=len(keys))))
        for layer, steps in per_layer.items():
            streams[layer].append(steps)
    return streams


def train_flashmoe(
    trace_path: str | Path,
    out: str | Path,
    capacities: str = "12.5%,25%,50%",
    seed: int = 0,
    phase: PhaseFilter = "decode",
    settings: TrainSettings | None = None,
    split: str | None = None,
) -> TrainReport:
    settings = settings or TrainSettings(seed=seed)
    trace = read_trace(trace_path)
    meta = trace.meta
    slots = parse_capacities(capacities, meta.num_experts, len(meta.moe_layers), "per-layer")
    if split is not None:
        parsed = parse_split(split)
    elif len(trace.sequences) == 1:
        parsed = Split("frac", 1.0 - settings.heldout_fraction)  # one stream: hold out its last steps
    else:
        train_ids, _ = split_sequences([s.seq_id for s in trace.sequences], settings.heldout_fraction)
        parsed = Split("seq", len(train_ids))
    train_part, heldout_part = split_trace(trace, parsed)
    train_ids = [s.seq_id for s in train_part.sequences]
    heldout_ids = [s.seq_id for s in heldout_part.sequences]
    replay = build_replay(train_part, phase, "per-sequence")
    log.info("training on sequences %s, holding out %s", train_ids, heldout_ids)
    model = build_model(
        layer_streams(replay),
        meta.num_experts,
        settings,
        {
            "trace": str(trace_path),
            "trace_fingerprint": trace_fingerprint(trace),
            "trace_model": meta.model,
            "top_k": meta.top_k,
            "phase": phase,
            "train_sequences": train_ids,
            "split": str(parsed),
            # Whole held-out sequences let `simulate` restrict itself without --split; a step split cannot.
            **({"heldout_sequences": heldout_ids} if parsed.kind == "seq" else {}),
        },
    )
    report = TrainReport(Path(out), model, train_ids, heldout_ids, str(parsed))
    heldout = build_replay(heldout_part, phase, "per-sequence")
    for capacity in slots:
        for spec in ("flashmoe", *BASELINES):
            result = run_replay(heldout, spec, capacity, "per-layer", seed, flashmoe_model=model)
            total = result.total()
            report.rows.append(
                {
                    "policy": spec,
                    "capacity_slots": capacity,
                    "capacity_pct": 100.0 * capacity / meta.num_experts,
                    "hits": total.hits,
                    "misses": total.misses,
                    "hit_rate": total.hit_rate,
                }
            )
    model.meta["heldout_evaluation"] = report.rows
    model.save(Path(out))
    return report
