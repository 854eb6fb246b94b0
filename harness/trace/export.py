"""Export a routing trace as a request stream for libCacheSim (its csv and oracleGeneral formats).

One request per access in the harness's replay order (`build_replay`: token steps in step order, MoE
layers in visiting order, a step's distinct experts of a layer in ascending id), so libCacheSim's
policies see the accesses the harness's policies see. Object id = layer * num_experts + expert (model
layer numbering), object size 1, so a libCacheSim cache size is a slot count. Time = the trace's step.

- `libcachesim-csv`: header `time,obj_id,obj_size`; read it with libCacheSim's csv reader (time field 1,
  obj id field 2, obj size field 3, header, delimiter ',').
- `oraclegeneral`: libCacheSim's binary oracleGeneral records, 24 bytes little-endian and packed:
  uint32 time, uint64 obj_id, uint32 obj_size, int64 next_access_vtime (the index of the next request
  to the same object, -1 if none), which oracles such as Belady read.

What libCacheSim cannot see: the harness serves a step's distinct experts of a layer together and never
evicts one of them for another (hits are touched first, then misses take victims among the rest);
libCacheSim serves one request at a time, so a miss may evict an expert the same step needs next. With
one expert per (step, layer) the two agree exactly (LRU hit for hit in the tests); with top-k routing
they differ (FLAME slice, top-6, per-layer LRU at 8/16/32 slots: libCacheSim 0.104/0.225/0.498 hit rate
against the harness's 0.136/0.261/0.528). The time column keeps the steps, so a step-aware replay of the
export (each step's resident experts served first) gives the harness's LRU counts again (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from harness.errors import HarnessError
from harness.trace.schema import Trace
from harness.trace.simulate import PhaseFilter, build_replay

ExportFormat = Literal["libcachesim-csv", "oraclegeneral"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = ("libcachesim-csv", "oraclegeneral")
ORACLE_GENERAL = np.dtype([("time", "<u4"), ("obj_id", "<u8"), ("obj_size", "<u4"), ("next_access_vtime", "<i8")])
"""libCacheSim's oracleGeneral record (numpy structured dtypes are packed: 24 bytes)."""


@dataclass
class ExportReport:
    requests: int
    objects: int
    layers: list[int]


def request_stream(trace: Trace, layer: int | None = None, phase: PhaseFilter = "all") -> tuple[np.ndarray, np.ndarray]:
    """(time, obj_id) of every access in replay order; `layer` keeps one MoE layer's accesses (its own cache
    in per-layer scope), None keeps all layers (one cache in global scope)."""
    if layer is not None and layer not in trace.meta.moe_layers:
        raise HarnessError(f"layer {layer} is not a MoE layer of the trace (moe_layers {trace.meta.moe_layers})")
    (stream,) = build_replay(trace, phase, "never").streams
    experts_n = trace.meta.num_experts
    times: list[int] = []
    ids: list[int] = []
    for call_layer, keys, now, _ in stream.calls:
        if layer is None or call_layer == layer:
            times += [now] * len(keys)
            ids += [call_layer * experts_n + e for _, e in keys]
    return np.array(times, dtype=np.int64), np.array(ids, dtype=np.int64)


def next_access(ids: np.ndarray) -> np.ndarray:
    """For each request, the index of the next request to the same object, or -1."""
    out = np.full(len(ids), -1, dtype=np.int64)
    order = np.lexsort((np.arange(len(ids)), ids))  # by object, then by position
    same = ids[order[1:]] == ids[order[:-1]]
    out[order[:-1][same]] = order[1:][same]
    return out


def export_libcachesim(
    trace: Trace, out: Path, fmt: ExportFormat, layer: int | None = None, phase: PhaseFilter = "all"
) -> ExportReport:
    if fmt not in EXPORT_FORMATS:
        raise HarnessError(f"unknown export format {fmt!r}; known formats: {', '.join(EXPORT_FORMATS)}")
    times, ids = request_stream(trace, layer, phase)
    if times.size and times.max() > np.iinfo(np.uint32).max:
        raise HarnessError(f"step {int(times.max())} does not fit libCacheSim's uint32 time field")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if fmt == "libcachesim-csv":
        with open(tmp, "w") as handle:
            handle.write("time,obj_id,obj_size\n")
            handle.writelines(f"{t},{i},1\n" for t, i in zip(times.tolist(), ids.tolist(), strict=True))
    else:
        records = np.empty(len(ids), dtype=ORACLE_GENERAL)
        records["time"], records["obj_id"], records["obj_size"] = times, ids, 1
        records["next_access_vtime"] = next_access(ids)
        records.tofile(tmp)
    tmp.replace(out)
    layers = list(trace.meta.moe_layers) if layer is None else [layer]
    return ExportReport(requests=len(ids), objects=len(np.unique(ids)), layers=layers)
