"""How the runtime issues expert reads: io_uring (the profiler's ring, harness.ssd.uring), or a thread pool of
blocking reads where io_uring is unusable.

A backend takes a batch of reads (one step's loads, or one prediction's prefetches) in one call and returns a
handle per read; handles complete in any order (`as_completed`) and every completed read goes through
`ExpertReader.complete_read`, the one place for the checks after a read. With io_uring a batch is one system call,
at most `queue_depth` reads are in flight (fio's `iodepth`), demand reads go ahead of queued prefetches (a queued
read can also be withdrawn, or moved ahead once a step needs it), a finished read's place in the ring is refilled
at once and its bytes are checked on a helper thread, and reads proceed while the caller computes. The ring is used
only from the thread that made it (it is set up single-issuer), so a read's end time is when that thread sees its
completion: the expert cache polls at every expert boundary, and a read's recorded latency is an upper bound by at
most one expert's compute (or one attention block, for a prefetch).

With either backend a prefetch starts only while no demand read is in flight (a prefetch a step needs counts as a
demand read): once on the device a read shares its bandwidth with every other read in flight, so at a queue depth
of 16 a next-layer prefetch started beside a step's demand reads would slow the reads that step waits for (measured
on olmoe-small at 25% cached: look-ahead ran 15-20% slower than plain `cache` that way). Prefetches fill the disk's
idle time.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import as_completed as futures_completed
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Literal, Protocol

from harness.errors import HarnessError
from harness.keys import ExpertKey
from harness.ssd import uring
from harness.ssd.readtime import ReadTimeModel
from harness.store.reader import ExpertReader, IoRecord

log = logging.getLogger(__name__)

BackendName = Literal["auto", "io_uring", "threads"]
SATURATION_SHARE = 0.95
"""The queue depth taken from a profile: the smallest measured depth reaching this share of the best
bandwidth at the expert size (deeper queues only add latency)."""


@dataclass(eq=False)
class PendingRead:
    """One read in flight (or queued): where it goes, and its record once complete."""

    key: ExpertKey
    buffer: memoryview
    record: IoRecord | None = None
    future: Future | None = None
    start_ns: int = 0
    background: bool = False
    """A prefetch no step waits for yet (it yields the device to demand reads)."""
    started: bool = False
    withdrawn: bool = False
    """Threads backend: the read began (its buffer is being written), or was cancelled before it began."""


class ReadBackend(Protocol):
    name: str
    queue_depth: int

    def submit(self, reads: list[tuple[ExpertKey, memoryview]], background: bool) -> list[PendingRead]:
        """Start `reads` together; `background` reads (prefetches) yield to demand reads."""
        ...

    def result(self, read: PendingRead) -> IoRecord:
        """Wait for `read` and return its record (raises what the read raised)."""
        ...

    def as_completed(self, reads: list[PendingRead]) -> Iterator[PendingRead]:
        """Yield `reads` as they complete."""
        ...

    def poll(self) -> None:
        """Note the completions already done, without waiting (their end times), and refill the queue."""
        ...

    def landed(self, read: PendingRead) -> bool:
        """Whether `read`'s bytes are in its buffer (as of the last `poll`); its check may still be running."""
        ...

    def cancel(self, read: PendingRead) -> bool:
        """Withdraw `read` if it has not started (True: its buffer is free and it will never complete)."""
        ...

    def promote(self, reads: list[PendingRead]) -> None:
        """Move the `reads` not yet started ahead of every other queued read (a prefetch a step now needs)."""
        ...

    def close(self) -> None: ...


class ThreadReads:
    """Blocking positional reads on two pools (demand, background) of `queue_depth` threads each. As with
    io_uring, a prefetch's read starts only while no demand read is in progress (unless a step needs it)."""

    name = "threads"

    def __init__(self, reader: ExpertReader, queue_depth: int) -> None:
        self.reader, self.queue_depth = reader, queue_depth
        self._demand = ThreadPoolExecutor(max_workers=queue_depth, thread_name_prefix="expert-io")
        self._background = ThreadPoolExecutor(max_workers=queue_depth, thread_name_prefix="expert-prefetch")
        self._demand_reads = 0
        """Demand reads submitted and not yet finished (read and checked)."""
        self._changed = threading.Condition()

    def _read_demand(self, key: ExpertKey, buffer: memoryview) -> IoRecord:
        try:
            return self.reader.read_into(key, buffer)
        finally:
            with self._changed:
                self._demand_reads -= 1
                self._changed.notify_all()

    def _read_background(self, read: PendingRead) -> IoRecord | None:
        with self._changed:
            self._changed.wait_for(lambda: self._demand_reads == 0 or not read.background or read.withdrawn)
            if read.withdrawn:
                return None  # cancelled while it waited: its buffer is no longer its own
            read.started = True
        return self.reader.read_into(read.key, read.buffer)

    def submit(self, reads: list[tuple[ExpertKey, memoryview]], background: bool) -> list[PendingRead]:
        pending = [PendingRead(key, buf, background=background) for key, buf in reads]
        for read in pending:
            if background:
                read.future = self._background.submit(self._read_background, read)
            else:
                with self._changed:
                    self._demand_reads += 1
                read.future = self._demand.submit(self._read_demand, read.key, read.buffer)
        return pending

    def result(self, read: PendingRead) -> IoRecord:
        if read.record is None:
            read.record = read.future.result()  # type: ignore[union-attr]
        return read.record

    def as_completed(self, reads: list[PendingRead]) -> Iterator[PendingRead]:
        by_future = {read.future: read for read in reads if read.future is not None}
        for future in futures_completed(list(by_future)):
            read = by_future[future]
            self.result(read)
            yield read

    def poll(self) -> None:
        """Worker threads time their own reads."""

    def landed(self, read: PendingRead) -> bool:
        return read.future is not None and read.future.done()  # a worker reads and checks in one task

    def cancel(self, read: PendingRead) -> bool:
        if read.future is None:
            return False
        if read.future.cancel():
            return True
        with self._changed:  # a prefetch still waiting for demand reads to finish has read nothing yet
            if read.background and not read.started and not read.future.done():
                read.withdrawn = True
                self._changed.notify_all()
                return True
        return False

    def promote(self, reads: list[PendingRead]) -> None:
        """A step needs `reads`: they no longer wait for demand reads (the background pool still runs its
        reads in order; a started one cannot move)."""
        with self._changed:
            for read in reads:
                read.background = False
            self._changed.notify_all()

    def close(self) -> None:
        self._background.shutdown(wait=True)
        self._demand.shutdown(wait=True)


def _address(buffer: memoryview) -> int:
    view = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(view)
    finally:
        del view  # an export left alive would pin the buffer


class UringReads:
    """Expert reads through one io_uring ring of `queue_depth` entries, kept full from a queue."""

    name = "io_uring"

    def __init__(self, reader: ExpertReader, queue_depth: int) -> None:
        self.reader, self.queue_depth = reader, queue_depth
        self.ring = uring.Ring(queue_depth)
        self._thread = threading.get_ident()
        self._queued: deque[PendingRead] = deque()
        self._inflight: dict[int, PendingRead] = {}
        self._next_id = 0
        # A finished read's checksum (most of a millisecond for an expert of a few MiB) runs here, not on the
        # compute thread; xxhash releases the GIL, so it overlaps the compute as the threads backend's does.
        self._checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-check")

    def _fill(self) -> None:
        """Prepare queued reads while the ring has room, a prefetch only while no demand read is in flight (demand
        reads queue ahead of prefetches, so a prefetch at the head means none is queued)."""
        demand_busy = any(not r.background for r in self._inflight.values())
        while self._queued and len(self._inflight) < self.queue_depth:
            if self._queued[0].background and demand_busy:
                break
            read = self._queued.popleft()
            demand_busy = demand_busy or not read.background
            self._next_id += 1
            entry = self.reader.index.entry(*read.key)
            self.ring.prepare(
                uring.OP_READ, self.reader.fd, _address(read.buffer), len(read.buffer), entry.offset, self._next_id
            )
            read.start_ns = time.perf_counter_ns()
            self._inflight[self._next_id] = read

    def _pump(self, wait: bool) -> None:
        """Submit what fits, wait for one completion if `wait`, and complete what is done."""
        self._fill()
        self.ring.submit(wait=1 if wait and self._inflight else 0, post=True)
        done = [(self._inflight.pop(user_data), result) for user_data, result in self.ring.reap()]
        end_ns = time.perf_counter_ns()
        if done and self._queued:  # room freed: start the next queued reads now, as fio keeps its queue full
            self._fill()
            self.ring.submit()
        for read, result in done:
            read.future = self._checker.submit(self._check, read, result, end_ns)

    def _check(self, read: PendingRead, result: int, end_ns: int) -> IoRecord:
        read.record = self.reader.complete_read(read.key, read.buffer, result, read.start_ns, end_ns)
        return read.record

    def submit(self, reads: list[tuple[ExpertKey, memoryview]], background: bool) -> list[PendingRead]:
        if threading.get_ident() != self._thread:
            raise HarnessError("io_uring expert reads submitted from a thread other than the ring's (single issuer)")
        pending = [PendingRead(key, buf, background=background) for key, buf in reads]
        if background:
            self._queued.extend(pending)
        else:
            self._queued.extendleft(reversed(pending))
        self._pump(wait=False)
        return pending

    def result(self, read: PendingRead) -> IoRecord:
        while read.future is None:
            self._pump(wait=True)
        return read.future.result()

    def as_completed(self, reads: list[PendingRead]) -> Iterator[PendingRead]:
        waiting = list(reads)
        while waiting:
            ready = [r for r in waiting if r.future is not None and r.future.done()]
            if not ready:
                checking = [r.future for r in waiting if r.future is not None]
                if checking:  # a check ends within a millisecond: wait for it rather than for the device
                    futures_wait(checking, return_when=FIRST_COMPLETED)
                else:
                    self._pump(wait=True)
                continue
            for read in ready:
                assert read.future is not None  # `ready` holds reads with a future only
                read.future.result()  # raises what the check raised
                waiting.remove(read)
                yield read

    def poll(self) -> None:
        if self._inflight:
            self._pump(wait=False)

    def landed(self, read: PendingRead) -> bool:
        return read.future is not None  # its check is submitted as its completion is seen

    def cancel(self, read: PendingRead) -> bool:
        if read.future is not None or read not in self._queued:
            return False
        self._queued.remove(read)
        return True

    def promote(self, reads: list[PendingRead]) -> None:
        for read in reads:
            read.background = False  # a step waits for it now, queued or in flight
        queued = [read for read in reads if read in self._queued]
        for read in queued:
            self._queued.remove(read)
        self._queued.extendleft(reversed(queued))

    def close(self) -> None:
        while self._inflight:  # the slots must not be written once their owner frees them
            self._pump(wait=True)
        self._queued.clear()
        self.ring.close()
        self._checker.shutdown(wait=True)


def queue_depth_from_profile(model: ReadTimeModel | None, block_bytes: int, default: int) -> tuple[int, str]:
    """The queue depth for expert reads, and how it was chosen: the profile's smallest measured depth that
    reaches SATURATION_SHARE of its best bandwidth at the expert size, else `default`."""
    if model is None:
        return default, f"default {default} (io_threads): no SSD profile for this disk"
    grid = model.bw.get("randread") or next(iter(model.bw.values()))
    depths = sorted({qd for by_qd in grid.values() for qd in by_qd})
    bandwidth = {qd: model.bandwidth_bytes_per_s(block_bytes, qd) for qd in depths}
    best = max(bandwidth.values())
    depth = next(qd for qd in depths if bandwidth[qd] >= SATURATION_SHARE * best)
    return depth, (
        f"profile {model.source}: smallest depth reaching {SATURATION_SHARE:.0%} of the best random-read "
        f"bandwidth at {block_bytes} B ({bandwidth[depth] / 1e6:.0f} of {best / 1e6:.0f} MB/s)"
    )


def make_backend(reader: ExpertReader, requested: BackendName, queue_depth: int) -> tuple[ReadBackend, str | None]:
    """The backend to read with, and why it is not the one asked for (None when it is)."""
    if requested not in ("auto", "io_uring", "threads"):
        raise HarnessError(f"unknown expert read backend {requested!r}: use auto, io_uring or threads")
    if requested == "threads":
        return ThreadReads(reader, queue_depth), None
    reason = uring.unavailable_reason()
    if reason is None:
        return UringReads(reader, queue_depth), None
    if requested == "io_uring":
        raise HarnessError(f"expert reads through io_uring were asked for, but {reason}")
    log.info("expert reads fall back to threads: %s", reason)
    return ThreadReads(reader, queue_depth), reason
