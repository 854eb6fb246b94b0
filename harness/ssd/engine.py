"""The harness's own I/O engine: queue depth Q as Q threads, each issuing blocking preadv/pwritev.

No io_uring binding for Python is both maintained and installable everywhere this runs, so
depth comes from threads (os.preadv releases the GIL while the kernel works); every result
says `backend: threads`. Buffers are anonymous mmaps, page-aligned as O_DIRECT needs.
A job ramps first (not counted), then runs until both its minimum duration and its minimum
count of I/Os are reached; latencies go to per-thread histograms merged at the end.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from harness.ssd.jobs import JobResult, JobSpec, LatencyHistogram, bucket_index, percentiles_from
from harness.ssd.target import drop_cache, open_target

log = logging.getLogger(__name__)

BACKEND = "threads"
# How often the main thread wakes while waiting for workers, so Ctrl-C is handled promptly (s).
_JOIN_POLL_S = 0.1


class _BlockOrder:
    """The next block to read, shared by a job's threads: fio's order, pass after pass.

    Sequential: 0, 1, ..., n-1. Random: a fresh permutation per pass (fio's random map), so no
    block is read twice within a pass. Between passes a buffered job drops the file from the
    page cache again (as fio's invalidate does per pass), so every pass is a cold read.
    """

    def __init__(self, fd: int, nblocks: int, *, sequential: bool, drop_between_passes: bool, seed: int) -> None:
        self._fd = fd
        self._n = nblocks
        self._sequential = sequential
        self._drop = drop_between_passes
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._i = 0
        self._order = self._new_pass()

    def _new_pass(self) -> np.ndarray | None:
        return None if self._sequential else self._rng.permutation(self._n)

    def next(self) -> int:
        with self._lock:
            if self._i == self._n:
                self._i = 0
                self._order = self._new_pass()
                if self._drop:
                    drop_cache(self._fd, flush=False)
            i = self._i
            self._i += 1
            return i if self._order is None else int(self._order[i])


@dataclass
class _WorkerState:
    hist: LatencyHistogram = field(default_factory=LatencyHistogram)
    ios: int = 0
    bytes: int = 0
    lat_sum_ns: int = 0
    lat_max_ns: int = 0
    last_completion_ns: int = 0
    error: BaseException | None = None


def run_job(
    spec: JobSpec, path: str, region_bytes: int, *, seed: int = 0, stop: threading.Event | None = None
) -> JobResult:
    """Run one job on `path` (first `region_bytes` bytes) and return what it measured after the ramp."""
    nblocks = region_bytes // spec.bs_bytes
    if nblocks < 1:
        raise ValueError(f"region of {region_bytes} bytes holds no block of {spec.bs_bytes} bytes")
    stop = stop or threading.Event()
    fd = open_target(path, write=spec.is_write, direct=spec.direct)
    try:
        drop_cache(fd, flush=spec.is_write)
        states = [_WorkerState() for _ in range(spec.iodepth)]
        order = _BlockOrder(
            fd, nblocks, sequential=spec.rw in ("read", "write"), drop_between_passes=not spec.direct, seed=seed
        )
        min_ios_each = -(-spec.min_ios // spec.iodepth)
        start_ns = time.perf_counter_ns()
        ramp_end_ns = start_ns + int(spec.ramp_s * 1e9)
        deadline_ns = ramp_end_ns + int(spec.runtime_s * 1e9)
        threads = [
            threading.Thread(
                target=_worker,
                args=(spec, fd, order, state, stop),
                kwargs={"ramp_end_ns": ramp_end_ns, "deadline_ns": deadline_ns, "min_ios": min_ios_each},
                name=f"ssd-io-{i}",
                daemon=True,
            )
            for i, state in enumerate(states)
        ]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(_JOIN_POLL_S)
        except BaseException:
            stop.set()
            for thread in threads:
                thread.join()
            raise
    finally:
        os.close(fd)
    for state in states:
        if state.error is not None:
            raise state.error
    hist = LatencyHistogram()
    for state in states:
        hist.merge(state.hist)
    ios = sum(s.ios for s in states)
    end_ns = max(s.last_completion_ns for s in states)
    return JobResult(
        spec=spec,
        engine="harness",
        backend=BACKEND,
        ios=ios,
        bytes=sum(s.bytes for s in states),
        elapsed_s=max(end_ns - ramp_end_ns, 0) * 1e-9,
        lat_mean_s=sum(s.lat_sum_ns for s in states) / ios * 1e-9 if ios else None,
        lat_max_s=max(s.lat_max_ns for s in states) * 1e-9 if ios else None,
        percentiles_s=percentiles_from(hist),
        hist=hist,
    )


def _worker(
    spec: JobSpec,
    fd: int,
    order: _BlockOrder,
    state: _WorkerState,
    stop: threading.Event,
    *,
    ramp_end_ns: int,
    deadline_ns: int,
    min_ios: int,
) -> None:
    bs = spec.bs_bytes
    buf = mmap.mmap(-1, bs)
    try:
        if spec.is_write:
            buf.write(os.urandom(bs))
        io = os.pwritev if spec.is_write else os.preadv
        counts = state.hist.counts
        clock = time.perf_counter_ns
        while not stop.is_set():
            block = order.next()
            t0 = clock()
            if t0 >= deadline_ns and state.ios >= min_ios:
                break
            done = io(fd, [buf], block * bs)
            t1 = clock()
            if done != bs:
                raise OSError(f"short {'write' if spec.is_write else 'read'}: {done} of {bs} bytes at {block * bs}")
            if t0 >= ramp_end_ns:
                lat = t1 - t0
                counts[bucket_index(lat)] += 1
                state.ios += 1
                state.bytes += done
                state.lat_sum_ns += lat
                if lat > state.lat_max_ns:
                    state.lat_max_ns = lat
                state.last_completion_ns = t1
    except BaseException as exc:  # handed to the main thread, which re-raises it
        state.error = exc
        stop.set()
    finally:
        buf.close()
