"""Measures what telemetry costs a run: a fixed CPU-bound workload timed with and without the sampler.

Two figures: the sampler thread's own CPU time as a share of the run (what it can take from the
run at most), and the slowdown of the workload (fastest of alternating with/without trials, which
also catches GIL contention). Run it with `python -m harness.telemetry --seconds 10 --hz 10`.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from harness.telemetry.recorder import Telemetry

# Matrix side of the workload's matmuls: small enough that Python overhead (GIL held) is a real
# share of each step, as in a token loop, large enough that each step does measurable work.
_MATMUL_SIDE = 128


def _workload(steps: int) -> tuple[float, float]:
    """A token-loop stand-in: small matmuls plus Python bookkeeping; returns (wall, thread CPU) seconds."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((_MATMUL_SIDE, _MATMUL_SIDE)).astype(np.float32)
    book: dict[int, int] = {}
    began, cpu = time.perf_counter(), time.thread_time()
    for step in range(steps):
        a = np.tanh(a @ a.T * 0.01)
        for key in range(64):
            book[key] = book.get(key, 0) + step
    return time.perf_counter() - began, time.thread_time() - cpu


def _calibrate(seconds: float) -> int:
    steps = 50
    while True:
        took, _ = _workload(steps)
        if took >= 0.2:
            return max(1, int(steps * seconds / took))
        steps *= 4


def measure_overhead(
    seconds: float = 10.0, hz: float = 10.0, trials: int = 3, device: str | None = None
) -> dict[str, Any]:
    """Time the workload `trials` times each way, alternating, with telemetry at `hz` on `device`."""
    steps = _calibrate(seconds)
    plain: list[tuple[float, float]] = []
    sampled: list[tuple[float, float]] = []
    cpu_pct: list[float] = []
    for _ in range(trials):
        plain.append(_workload(steps))
        tel = Telemetry(hz, device=device).start()
        sampled.append(_workload(steps))
        summary = tel.stop()
        cpu_pct.append(summary["overhead"]["sampler_cpu_pct_of_run"])
    # The least-disturbed trial of each kind: on a shared machine noise only ever adds time.
    base, with_tel = min(w for w, _ in plain), min(w for w, _ in sampled)
    # The workload thread's own CPU time ignores other processes: the steadier figure on a busy machine.
    base_cpu, with_cpu = min(c for _, c in plain), min(c for _, c in sampled)
    return {
        "hz": hz,
        "device": device,
        "trials": trials,
        "workload_s": base,
        "without_telemetry_s": [w for w, _ in plain],
        "with_telemetry_s": [w for w, _ in sampled],
        "slowdown_pct": 100.0 * (with_tel - base) / base,
        "slowdown_cpu_pct": 100.0 * (with_cpu - base_cpu) / base_cpu,
        "sampler_cpu_pct_of_run": statistics.median(cpu_pct),
    }


def event_cost_s(events: int = 100_000) -> float:
    """Seconds one `Telemetry.event()` call costs (the per-expert-load price in the hot path)."""
    tel = Telemetry(1.0, gpu_index=None)
    began = time.perf_counter()
    for i in range(events):
        tel.event("expert_load", layer=i, expert=i, bytes=4096)
    return (time.perf_counter() - began) / events


def default_device() -> str | None:
    from harness.ssd.devices import block_device_for_path

    return block_device_for_path(Path.cwd())
