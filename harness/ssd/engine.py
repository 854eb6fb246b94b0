"""The harness's own I/O engine: queue depth Q through io_uring where the kernel allows it, else Q threads.

`io_uring`: one thread keeps Q reads (or writes) in flight on one ring (`harness.ssd.uring`), as
fio's io_uring engine does, submitting each replacement as soon as a completion is reaped.
`threads`: Q threads each issue blocking preadv/pwritev (os.preadv releases the GIL while the
kernel works), as fio's psync engine with Q jobs would. Every result names its backend. Buffers
are `harness.iomem.IoBuffer`s (huge-page-backed where granted, so requests are not split at the
device's segment limit); each result says what share of them got huge pages. A job ramps first, then runs until both its
minimum duration and its minimum count of I/Os are reached; as in fio, an I/O counts when it
completes after the ramp. Latency is from submission to completion, into log-linear histograms.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from harness.errors import HarnessError
from harness.iomem import IoBuffer
from harness.ssd import uring
from harness.ssd.jobs import JobResult, JobSpec, LatencyHistogram, bucket_index, percentiles_from
from harness.ssd.target import drop_cache, open_target

log = logging.getLogger(__name__)

BACKENDS = ("io_uring", "threads")
BACKEND_NOTES = {
    "io_uring": "queue depth Q = Q requests kept in flight on one io_uring ring (IORING_OP_READ/WRITE)",
    "threads": "queue depth Q = Q threads issuing blocking preadv/pwritev",
}
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


def resolve_backend(requested: str = "auto") -> str:
    """'auto' -> io_uring where it works here, else threads; a named backend must work or is refused."""
    if requested not in ("auto", *BACKENDS):
        raise HarnessError(f"unknown I/O backend {requested!r}: use auto, io_uring or threads")
    reason = uring.unavailable_reason()
    if requested == "auto":
        if reason is not None:
            log.info("%s: queue depth through threads", reason)
        return "threads" if reason is not None else "io_uring"
    if requested == "io_uring" and reason is not None:
        raise HarnessError(f"{reason}: use --io-backend threads")
    return requested


@dataclass
class _Tally:
    """What I/Os completing after the ramp added up to (one per thread, or one for the ring)."""

    hist: LatencyHistogram = field(default_factory=LatencyHistogram)
    ios: int = 0
    bytes: int = 0
    lat_sum_ns: int = 0
    lat_max_ns: int = 0
    last_completion_ns: int = 0
    error: BaseException | None = None
    huge_page_share: float = 0.0  # of this tally's I/O buffer

    def add(self, latency_ns: int, nbytes: int, completed_ns: int) -> None:
        self.hist.counts[bucket_index(latency_ns)] += 1
        self.ios += 1
        self.bytes += nbytes
        self.lat_sum_ns += latency_ns
        if latency_ns > self.lat_max_ns:
            self.lat_max_ns = latency_ns
        self.last_completion_ns = completed_ns


def run_job(
    spec: JobSpec,
    path: str,
    region_bytes: int,
    *,
    seed: int = 0,
    stop: threading.Event | None = None,
    backend: str = "auto",
    buffers: int | None = None,
) -> JobResult:
    """Run one job on `path` (first `region_bytes` bytes) and return what it measured after the ramp. `buffers`
    (io_uring only): the requests rotate over this many block buffers (at least the depth), each request taking
    the buffer freed longest ago, as a cache's reads land in many different slots; None: one buffer per request in
    flight, as fio."""
    backend = resolve_backend(backend)
    if buffers is not None and (backend != "io_uring" or buffers < spec.iodepth):
        raise ValueError(f"{buffers} rotating buffers need the io_uring backend and at least {spec.iodepth}")
    nblocks = region_bytes // spec.bs_bytes
    if nblocks < 1:
        raise ValueError(f"region of {region_bytes} bytes holds no block of {spec.bs_bytes} bytes")
    stop = stop or threading.Event()
    fd = open_target(path, write=spec.is_write, direct=spec.direct)
    try:
        drop_cache(fd, flush=spec.is_write)
        order = _BlockOrder(
            fd, nblocks, sequential=spec.rw in ("read", "write"), drop_between_passes=not spec.direct, seed=seed
        )
        start_ns = time.perf_counter_ns()
        window = _Window(
            ramp_end_ns=start_ns + int(spec.ramp_s * 1e9),
            deadline_ns=start_ns + int((spec.ramp_s + spec.runtime_s) * 1e9),
            min_ios=spec.min_ios,
        )
        if backend == "io_uring":
            tallies = _run_ring(spec, fd, order, window, stop, buffers or spec.iodepth)
        else:
            tallies = _run_threads(spec, fd, order, window, stop)
    finally:
        os.close(fd)
    hist = LatencyHistogram()
    for tally in tallies:
        hist.merge(tally.hist)
    ios = sum(t.ios for t in tallies)
    end_ns = max(t.last_completion_ns for t in tallies)
    return JobResult(
        spec=spec,
        engine="harness",
        backend=backend,
        ios=ios,
        bytes=sum(t.bytes for t in tallies),
        elapsed_s=max(end_ns - window.ramp_end_ns, 0) * 1e-9,
        lat_mean_s=sum(t.lat_sum_ns for t in tallies) / ios * 1e-9 if ios else None,
        lat_max_s=max(t.lat_max_ns for t in tallies) * 1e-9 if ios else None,
        percentiles_s=percentiles_from(hist),
        hist=hist,
        # Every tally's buffer has the same size (depth x block size, or one block per thread).
        huge_page_share=sum(t.huge_page_share for t in tallies) / len(tallies),
    )


@dataclass(frozen=True)
class _Window:
    """When a job's I/Os count (completed after `ramp_end_ns`) and when it stops issuing new ones (both
    `deadline_ns` passed and `min_ios` counted)."""

    ramp_end_ns: int
    deadline_ns: int
    min_ios: int


def _buffers(spec: JobSpec, count: int) -> IoBuffer:
    """`count` buffers of the block size in one huge-page-backed region; random bytes for writes."""
    region = IoBuffer(spec.bs_bytes * count)
    if spec.is_write:
        for i in range(count):
            region.view[i * spec.bs_bytes : (i + 1) * spec.bs_bytes] = os.urandom(spec.bs_bytes)
    return region


def _run_ring(
    spec: JobSpec, fd: int, order: _BlockOrder, window: _Window, stop: threading.Event, count: int
) -> list[_Tally]:
    """Keep `spec.iodepth` requests in flight on one ring, over `count` block buffers taken in the order they free
    up (`count` = the depth: each request slot keeps its buffer, as fio)."""
    bs, depth = spec.bs_bytes, spec.iodepth
    opcode = uring.OP_WRITE if spec.is_write else uring.OP_READ
    tally = _Tally()
    clock = time.perf_counter_ns
    buffers = _buffers(spec, count)
    tally.huge_page_share = buffers.huge_page_share
    try:
        base = buffers.address
        submitted_ns = [0] * count  # per buffer (the request's user_data)
        free = deque(range(count))
        with uring.Ring(depth) as ring:
            in_flight = 0
            fresh: list[int] = []  # buffers prepared since the last submit
            for _ in range(depth):
                slot = free.popleft()
                ring.prepare(opcode, fd, base + slot * bs, bs, order.next() * bs, slot)
                fresh.append(slot)
            while True:
                now = clock()
                for slot in fresh:
                    submitted_ns[slot] = now
                in_flight += len(fresh)
                fresh.clear()
                if not in_flight:
                    break
                ring.submit(wait=1)
                done_ns = clock()
                finishing = stop.is_set() or (done_ns >= window.deadline_ns and tally.ios >= window.min_ios)
                for slot, result in ring.reap():
                    in_flight -= 1
                    if result != bs:
                        what = "write" if spec.is_write else "read"
                        if result < 0:
                            raise OSError(-result, f"io_uring {what}: {os.strerror(-result)}")
                        raise OSError(f"short {what}: {result} of {bs} bytes")
                    if done_ns >= window.ramp_end_ns:
                        tally.add(done_ns - submitted_ns[slot], bs, done_ns)
                    free.append(slot)
                    if not finishing:
                        slot = free.popleft()
                        ring.prepare(opcode, fd, base + slot * bs, bs, order.next() * bs, slot)
                        fresh.append(slot)
    finally:
        buffers.close()
    return [tally]


def _run_threads(spec: JobSpec, fd: int, order: _BlockOrder, window: _Window, stop: threading.Event) -> list[_Tally]:
    tallies = [_Tally() for _ in range(spec.iodepth)]
    min_ios_each = -(-window.min_ios // spec.iodepth)
    threads = [
        threading.Thread(
            target=_worker,
            args=(spec, fd, order, tally, stop, window, min_ios_each),
            name=f"ssd-io-{i}",
            daemon=True,
        )
        for i, tally in enumerate(tallies)
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
    for tally in tallies:
        if tally.error is not None:
            raise tally.error
    return tallies


def _worker(
    spec: JobSpec,
    fd: int,
    order: _BlockOrder,
    tally: _Tally,
    stop: threading.Event,
    window: _Window,
    min_ios: int,
) -> None:
    bs = spec.bs_bytes
    buf = _buffers(spec, 1)
    tally.huge_page_share = buf.huge_page_share
    try:
        io = os.pwritev if spec.is_write else os.preadv
        clock = time.perf_counter_ns
        while not stop.is_set():
            block = order.next()
            t0 = clock()
            if t0 >= window.deadline_ns and tally.ios >= min_ios:
                break
            done = io(fd, [buf.view], block * bs)
            t1 = clock()
            if done != bs:
                raise OSError(f"short {'write' if spec.is_write else 'read'}: {done} of {bs} bytes at {block * bs}")
            if t1 >= window.ramp_end_ns:
                tally.add(t1 - t0, done, t1)
    except BaseException as exc:  # handed to the main thread, which re-raises it
        tally.error = exc
        stop.set()
    finally:
        buf.close()
