"""Expert weights on the compute device: an expert computes on the device of the hidden state it is applied to.

An expert source yields weights wherever its slots live: host RAM slots, a memory map of the expert file, or
VRAM slots of a device tier. `to_device` leaves weights already on the compute device as they are (the CPU
path: no copy, no new op, so CPU runs stay bit-identical and as fast) and brings the others over. To a CUDA
device the copies are non-blocking on a dedicated copy stream (asynchronous from pinned host memory; from
pageable memory the driver stages them), and the compute stream waits on the copy's event, not on the whole
device, so the copy of one expert overlaps the compute of the one before. The source slot may be rewritten as
soon as the caller moves on, so the caller waits for the copy event (not the compute) before it does.

`DeviceTimeline` records CUDA events around copies and expert computes and turns them into intervals on the
run's telemetry clock at the end (one reference event synchronised against the host clock), so the overlap of
copy and compute can be read beside the run's events and NVML samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from harness.runtime.spans import covered_s, union

if TYPE_CHECKING:
    from harness.runtime.offloaded import ExpertWeights

DEVICE_SPANS_FILE = "device_spans.parquet"
_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The dedicated host-to-device copy stream of a CUDA device (one per device, made on first use)."""
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


def to_device(
    weights: ExpertWeights, device: torch.device, timeline: DeviceTimeline | None = None
) -> tuple[ExpertWeights, torch.cuda.Event | None]:
    """`weights` on `device`, and the event that marks the end of their copy (None when nothing was copied
    asynchronously). Tensors already there are returned as they are."""
    if all(t.device == device for t in weights.values()):
        return weights, None
    if device.type != "cuda":  # e.g. VRAM slots computed on the CPU: a blocking copy back
        return {name: t.to(device) for name, t in weights.items()}, None
    stream, compute = copy_stream(device), torch.cuda.current_stream(device)
    start = timeline.event(stream) if timeline is not None else None
    with torch.cuda.stream(stream):
        moved = {name: t if t.device == device else t.to(device, non_blocking=True) for name, t in weights.items()}
    done = torch.cuda.Event(enable_timing=timeline is not None)
    done.record(stream)
    compute.wait_event(done)
    for tensor in moved.values():
        # Allocated on the copy stream, used on the compute stream: the allocator must not hand the memory to
        # the next copy before this compute is done.
        tensor.record_stream(compute)
    if timeline is not None and start is not None:
        timeline.spans.append(("copy", start, done))
    return moved, done


@dataclass
class DeviceTimeline:
    """CUDA event pairs of copies and expert computes, placed on a host clock (`clock`, seconds) at the end."""

    device: torch.device
    clock: Callable[[], float]
    spans: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)

    def __post_init__(self) -> None:
        torch.cuda.synchronize(self.device)
        self._ref = self.event(torch.cuda.current_stream(self.device))
        self._ref.synchronize()
        self._t_ref_s = self.clock()  # the reference event's time on the host clock (to the synchronise's latency)

    @staticmethod
    def event(stream: torch.cuda.Stream) -> torch.cuda.Event:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        return ev

    def compute(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run `forward` (an expert's compute, enqueued on the current stream) between two timed events."""
        stream = torch.cuda.current_stream(self.device)
        start = self.event(stream)
        out = forward()
        self.spans.append(("compute", start, self.event(stream)))
        return out

    def intervals(self) -> list[tuple[str, float, float]]:
        """(kind, start s, end s) of every span on the host clock; waits for the device to finish."""
        torch.cuda.synchronize(self.device)
        return [
            (kind, self._t_ref_s + self._ref.elapsed_time(a) / 1e3, self._t_ref_s + self._ref.elapsed_time(b) / 1e3)
            for kind, a, b in self.spans
        ]


def write_spans(intervals: list[tuple[str, float, float]], path: Path) -> Path:
    """The device's copy and compute intervals (kind, t_start_s, t_end_s on the telemetry clock) as Parquet."""
    table = pa.table(
        {
            "kind": pa.array([kind for kind, _, _ in intervals], pa.string()),
            "t_start_s": pa.array([a for _, a, _ in intervals], pa.float64()),
            "t_end_s": pa.array([b for _, _, b in intervals], pa.float64()),
        }
    )
    pq.write_table(table, path)
    return path


def overlap_summary(intervals: list[tuple[str, float, float]]) -> dict[str, float | int | None]:
    """Seconds the device copied, computed, and did both at once (the union of each kind, then their
    intersection), from (kind, start, end) intervals with kind 'copy' or 'compute'."""
    copy = union([(a, b) for kind, a, b in intervals if kind == "copy"])
    compute = union([(a, b) for kind, a, b in intervals if kind == "compute"])
    both = covered_s(copy, compute)
    copy_s = sum(b - a for a, b in copy)
    return {
        "copies": sum(kind == "copy" for kind, _, _ in intervals),
        "computes": sum(kind == "compute" for kind, _, _ in intervals),
        "copy_s": copy_s,
        "compute_s": sum(b - a for a, b in compute),
        "copy_compute_overlap_s": both,
        "copy_hidden_pct": 100 * both / copy_s if copy_s else None,
    }
