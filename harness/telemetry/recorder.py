"""The telemetry sampler thread, the event log on the same clock, and the Parquet files they become.

`Telemetry.start()` starts a daemon thread that reads every probe `hz` times a second into column
lists; `event(name, **fields)` appends a timestamped event from any thread; `stop(folder)` joins
the thread and writes `timeline.parquet` (one row per sample) and `events.parquet` (one row per
event, one nullable column per field name). Both use `t_s`: seconds since `start()` on the
monotonic `time.perf_counter` clock, so the report can line events up with samples.

The sampler measures its own cost (thread CPU time) and reports it as a share of the run's wall time.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from harness.errors import HarnessError
from harness.telemetry.probes import CgroupProbe, DiskProbe, GpuProbe, HostProbe, ProcessIoProbe, open_gpu

log = logging.getLogger(__name__)

TIMELINE_FILE = "timeline.parquet"
EVENTS_FILE = "events.parquet"
_RESERVED = frozenset({"t_s", "name"})


class Telemetry:
    """Samples disk, host, cgroup and GPU counters beside a run and logs the run's events.

    `device` is the whole-disk kernel name ("nvme0n1", "vda") of the disk that holds the expert
    file; give `path` instead to have it looked up. Without either, disk columns are absent.
    """

    def __init__(
        self,
        hz: float = 10.0,
        *,
        device: str | None = None,
        path: str | Path | None = None,
        cgroup_path: str | Path | None = None,
        gpu_index: int | None = 0,
    ) -> None:
        if not hz > 0:
            raise HarnessError(f"telemetry_hz must be positive, got {hz}")
        self.hz = float(hz)
        self.missing: dict[str, str] = {}
        self.device = device
        if self.device is None and path is not None:
            from harness.ssd.devices import block_device_for_path

            self.device = block_device_for_path(path)
            if self.device is None:
                self.missing["disk"] = f"no block device found for {path}"
        elif self.device is None:
            self.missing["disk"] = "no device or path given"
        self._probes: list[DiskProbe | HostProbe | ProcessIoProbe | CgroupProbe | GpuProbe] = []
        self._build_probes(cgroup_path, gpu_index)
        self._columns: list[str] = ["t_s"] + [c for p in self._probes for c in p.columns]
        self._rows: list[tuple[float, ...]] = []
        self._events: list[tuple[float, str, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._start_unix = 0.0
        self._sampler_cpu_s = 0.0
        self._sampler_busy_s = 0.0

    def _build_probes(self, cgroup_path: str | Path | None, gpu_index: int | None) -> None:
        if self.device is not None:
            try:
                self._probes.append(DiskProbe(self.device))
            except (OSError, IndexError, ValueError) as exc:
                self.missing["disk"] = f"cannot read /sys/block/{self.device}/stat: {exc}"
                self.device = None
        self._probes.append(HostProbe())
        try:
            self._probes.append(ProcessIoProbe())
        except OSError as exc:  # some containers hide /proc/<pid>/io
            self.missing["process_io"] = f"cannot read /proc/self/io: {exc}"
        if cgroup_path is not None:
            try:
                self._probes.append(CgroupProbe(cgroup_path))
            except OSError as exc:
                self.missing["cgroup"] = str(exc)
        self.gpu_name: str | None = None
        if gpu_index is None:
            self.missing["gpu"] = "GPU telemetry not requested"
            return
        gpu, reason = open_gpu(gpu_index)
        if gpu is None:
            self.missing["gpu"] = reason or "no GPU"
            return
        self.gpu_name = gpu.name
        self._probes.append(gpu)
        for column, why in gpu.unsupported.items():
            self.missing[column] = why

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    def now(self) -> float:
        """Seconds since start() on the telemetry clock (the `t_s` of samples and events)."""
        return time.perf_counter() - self._t0

    def start(self) -> Telemetry:
        if self._thread is not None:
            raise RuntimeError("telemetry already started")
        self._t0 = time.perf_counter()
        self._start_unix = time.time()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="telemetry-sampler", daemon=True)
        self._thread.start()
        return self

    def event(self, name: str, **fields: Any) -> None:
        """Record an event now (callable from any thread; a list append, about a microsecond)."""
        self._events.append((time.perf_counter() - self._t0, name, fields))

    def _sample(self) -> None:
        row: list[float] = [time.perf_counter() - self._t0]
        for probe in self._probes:
            row.extend(probe.read())
        self._rows.append(tuple(row))

    def _loop(self) -> None:
        period = 1.0 / self.hz
        deadline = time.perf_counter()
        cpu0 = time.thread_time()
        while True:
            deadline += period
            delay = deadline - time.perf_counter()
            if delay < 0:
                # Fell behind (a slow probe): restart the schedule instead of sampling in a burst.
                deadline = time.perf_counter()
                delay = 0.0
            if self._stop.wait(delay):
                break
            began = time.perf_counter()
            self._sample()
            self._sampler_busy_s += time.perf_counter() - began
        self._sampler_cpu_s = time.thread_time() - cpu0

    def stop(self, folder: str | Path | None = None) -> dict[str, Any]:
        """Stop sampling, take a last sample, write the Parquet files into `folder`, return the summary."""
        if self._thread is None:
            raise RuntimeError("telemetry was not started")
        self._stop.set()
        self._thread.join()
        self._sample()
        duration_s = self.now()
        for probe in self._probes:
            if isinstance(probe, GpuProbe):
                probe.close()
        summary = self.summary(duration_s)
        if folder is not None:
            folder = Path(folder)
            folder.mkdir(parents=True, exist_ok=True)
            _write_parquet(self.timeline_table(), folder / TIMELINE_FILE)
            _write_parquet(self.events_table(), folder / EVENTS_FILE)
            summary["files"] = {"timeline": TIMELINE_FILE, "events": EVENTS_FILE}
        return summary

    def summary(self, duration_s: float) -> dict[str, Any]:
        samples = len(self._rows)
        return {
            "hz": self.hz,
            "clock": "time.perf_counter seconds since telemetry start",
            "start_unix_s": self._start_unix,
            "duration_s": duration_s,
            "samples": samples,
            "achieved_hz": (samples - 1) / duration_s if duration_s > 0 and samples > 1 else None,
            "events": len(self._events),
            "disk_device": self.device,
            "gpu": {"available": self.gpu_name is not None, "name": self.gpu_name, "reason": self.missing.get("gpu")},
            "columns": self.columns,
            "missing": dict(self.missing),
            "overhead": {
                # CPU the sampler thread consumed; on a busy machine it is taken from the run.
                "sampler_cpu_s": self._sampler_cpu_s,
                # Wall time inside probe reads, NVML's blocking PCIe window included.
                "sampler_busy_s": self._sampler_busy_s,
                "sampler_cpu_pct_of_run": 100.0 * self._sampler_cpu_s / duration_s if duration_s > 0 else None,
            },
        }

    def timeline_table(self) -> pa.Table:
        columns = list(zip(*self._rows, strict=True)) if self._rows else [() for _ in self._columns]
        arrays = [pa.array(col, type=pa.float64()) for col in columns]
        table = pa.Table.from_arrays(arrays, names=self._columns)
        meta = {
            b"hz": str(self.hz).encode(),
            b"start_unix_s": repr(self._start_unix).encode(),
            b"disk_device": (self.device or "").encode(),
            b"gpu_name": (self.gpu_name or "").encode(),
        }
        return table.replace_schema_metadata(meta)

    def events_table(self) -> pa.Table:
        """One row per event: t_s, name, and one nullable column per field name seen."""
        names: list[str] = []
        for _, _, fields in self._events:
            for key in fields:
                if key not in names:
                    if key in _RESERVED:
                        raise ValueError(f"event field {key!r} clashes with a reserved column")
                    names.append(key)
        arrays = [
            pa.array([t for t, _, _ in self._events], type=pa.float64()),
            pa.array([n for _, n, _ in self._events], type=pa.string()).dictionary_encode(),
        ]
        for key in names:
            arrays.append(_column([fields.get(key) for _, _, fields in self._events]))
        return pa.Table.from_arrays(arrays, names=["t_s", "name", *names])

    def __enter__(self) -> Telemetry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None and not self._stop.is_set():
            self.stop()


def _column(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # Mixed types under one field name: keep them readable as text rather than drop them.
        return pa.array([None if v is None else str(v) for v in values], type=pa.string())


def _write_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def read_timeline(folder: str | Path) -> tuple[pa.Table | None, pa.Table | None]:
    """The timeline and events tables of a run folder (None for a file that is absent)."""
    folder = Path(folder)
    timeline = folder / TIMELINE_FILE
    events = folder / EVENTS_FILE
    return (
        pq.read_table(timeline) if timeline.is_file() else None,
        pq.read_table(events) if events.is_file() else None,
    )
