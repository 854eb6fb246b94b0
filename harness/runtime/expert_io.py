"""How the runtime issues expert reads: io_uring (the profiler's ring, harness.ssd.uring), or a thread pool of
blocking reads where io_uring is unusable.

A backend takes a batch of reads (one step's loads, or one prediction's prefetches) in one call and returns a
handle per read, with a future that resolves to the read's record once its bytes are checked; handles complete in
any order (`as_completed`) and every completed read goes through `ExpertReader.complete_read`, the one place for
the checks after a read. With io_uring a thread of the backend owns the ring (single issuer): it sleeps in the
kernel until a read completes or a submission wakes it (an eventfd read in the ring), refills the freed places at
once and then checks the finished reads' bytes, so reads proceed while the caller computes, at most `queue_depth`
in flight (fio's `iodepth`), and a read's end time is when its completion woke that thread. Demand reads go ahead
of queued prefetches (a queued read can also be withdrawn, or moved ahead once a step needs it).

With either backend a prefetch starts only while no demand read is in flight (a prefetch a step needs counts as a
demand read): once on the device a read shares its bandwidth with every other read in flight, so at a queue depth
of 16 a next-layer prefetch started beside a step's demand reads would slow the reads that step waits for (measured
on olmoe-small at 25% cached: look-ahead ran 15-20% slower than plain `cache` that way). Prefetches fill the disk's
idle time.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import as_completed as futures_completed
from dataclasses import dataclass
from typing import Literal, Protocol

from harness.errors import HarnessError
from harness.keys import ExpertKey
from harness.ssd import uring
from harness.ssd.readtime import ReadTimeModel
from harness.store.reader import ExpertReader, IoRecord

log = logging.getLogger(__name__)

BackendName = Literal["auto", "io_uring", "threads"]
KNEE_GAIN = 1.05
"""A profile's deeper queue is taken only while it adds at least 5% bandwidth at the expert size over the measured
depth before it: past that knee a deeper queue adds latency (a step's demand read waits behind every read in flight)
and little bandwidth."""
KNEE_FLOOR = 0.8
"""The knee is looked for among the depths reaching 80% of the best bandwidth (a curve flat at low depths and rising
later is not cut at its first plateau)."""


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
    landed: bool = False
    """io_uring: the read completed (its bytes are in its buffer; their check may still be running)."""


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

    def landed(self, read: PendingRead) -> bool:
        """Whether `read`'s bytes are in its buffer; its check may still be running."""
        ...

    def cancel(self, read: PendingRead) -> bool:
        """Withdraw `read` if it has not started (True: its buffer is free and it will never complete)."""
        ...

    def promote(self, reads: list[PendingRead]) -> None:
        """Move the `reads` not yet started ahead of every other queued read (a prefetch a step now needs)."""
        ...

    def close(self) -> None: ...


_WAKE = 0
"""The user_data of the io_uring ring's wake-up read (reads are numbered from 1)."""


class FutureReads:
    """What both backends share: every read has a future from its submission, resolved with its record."""

    def result(self, read: PendingRead) -> IoRecord:
        assert read.future is not None  # every read gets its future when submitted
        read.record = read.future.result()
        return read.record

    def as_completed(self, reads: list[PendingRead]) -> Iterator[PendingRead]:
        by_future = {read.future: read for read in reads if read.future is not None}
        for future in futures_completed(list(by_future)):
            read = by_future[future]
            self.result(read)
            yield read


class ThreadReads(FutureReads):
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


class UringReads(FutureReads):
    """Expert reads through one io_uring ring of `queue_depth` read entries, owned and kept full by a thread of its
    own (the ring's only issuer), which sleeps in the kernel until a read completes or a submission wakes it."""

    name = "io_uring"

    def __init__(self, reader: ExpertReader, queue_depth: int) -> None:
        self.reader, self.queue_depth = reader, queue_depth
        self._lock = threading.Lock()
        """Guards the queue, the reads in flight, the reads' `background` flags and the flags below."""
        self._queued: deque[PendingRead] = deque()
        self._inflight: dict[int, PendingRead] = {}
        self._next_id = _WAKE
        self._wake_fd = os.eventfd(0)  # blocking: the ring's read of it waits for a write
        self._wake_word = ctypes.c_uint64()
        self._wake_pending = False
        """A wake-up was written and the ring thread has not yet seen it (another write would add nothing)."""
        self._closing = False
        self._failure: BaseException | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="expert-io", daemon=True)
        self._thread.start()
        ready.wait()
        if self._failure is not None:
            self._thread.join()
            os.close(self._wake_fd)
            raise self._failure

    def _run(self, ready: threading.Event) -> None:
        try:
            # Made on this thread: a single-issuer ring belongs to the thread that sets it up. One more entry
            # than the depth, for the wake-up read.
            ring = uring.Ring(self.queue_depth + 1)
        except BaseException as exc:  # whatever it is, the constructor waiting on `ready` raises it
            self._failure = exc
            ready.set()
            return
        ready.set()
        failure = None
        try:
            self._arm_wake(ring)
            while True:
                with self._lock:
                    self._fill(ring)
                    if self._closing and not self._inflight:
                        break
                ring.submit(wait=1)  # the GIL is released while the thread sleeps in the kernel
                self._complete(ring)
        except BaseException as exc:  # every waiting read must learn why it will never complete
            failure = exc
        ring.close()  # the kernel cancels what is still in flight and waits for it: the buffers are free after
        if failure is not None:
            self._fail(failure)

    def _arm_wake(self, ring: uring.Ring) -> None:
        ring.prepare(uring.OP_READ, self._wake_fd, ctypes.addressof(self._wake_word), 8, 0, _WAKE)

    def _startable(self) -> bool:
        """Whether the read at the head of the queue may start now (under the lock): the ring has room, and it is a
        demand read or no demand read is in flight (demand reads queue ahead of prefetches, so a prefetch at the
        head means none is queued)."""
        if not self._queued or len(self._inflight) >= self.queue_depth:
            return False
        return not self._queued[0].background or all(r.background for r in self._inflight.values())

    def _fill(self, ring: uring.Ring) -> None:
        """Prepare the queued reads that may start (`_startable`). Under the lock."""
        while self._startable():
            read = self._queued.popleft()
            self._next_id += 1
            entry = self.reader.index.entry(*read.key)
            ring.prepare(
                uring.OP_READ, self.reader.fd, _address(read.buffer), len(read.buffer), entry.offset, self._next_id
            )
            read.start_ns = time.perf_counter_ns()
            self._inflight[self._next_id] = read

    def _complete(self, ring: uring.Ring) -> None:
        """Note the completions ready, refill the ring at once (as fio keeps its queue full), then check the
        finished reads' bytes."""
        done = ring.reap()
        end_ns = time.perf_counter_ns()
        finished = []
        with self._lock:
            for user_data, result in done:
                if user_data == _WAKE:
                    self._wake_pending = False
                    self._arm_wake(ring)
                    continue
                read = self._inflight.pop(user_data)
                read.landed = True
                finished.append((read, result))
            if finished:
                self._fill(ring)
        if finished:
            ring.submit()
        for read, result in finished:
            self._check(read, result, end_ns)

    def _check(self, read: PendingRead, result: int, end_ns: int) -> None:
        assert read.future is not None  # every read gets its future when submitted
        try:
            read.record = self.reader.complete_read(read.key, read.buffer, result, read.start_ns, end_ns)
        except BaseException as exc:  # raised to whoever waits for the read
            read.future.set_exception(exc)
        else:
            read.future.set_result(read.record)

    def _fail(self, exc: BaseException) -> None:
        error = HarnessError(f"expert reads through io_uring failed: {exc}")
        with self._lock:
            self._failure = error
            reads = [*self._inflight.values(), *self._queued]
            self._inflight.clear()
            self._queued.clear()
        for read in reads:
            assert read.future is not None
            read.future.set_exception(error)

    def _wake(self) -> None:
        """Wake the ring thread (under the lock) if a read may start now or the backend is closing, and no wake-up
        is pending. A full ring, or a prefetch behind a demand read, starts when a read completes, which wakes the
        thread anyway."""
        if (self._startable() or self._closing) and not self._wake_pending:
            self._wake_pending = True
            os.eventfd_write(self._wake_fd, 1)  # completes the ring's wake-up read; a counter, it never blocks

    def submit(self, reads: list[tuple[ExpertKey, memoryview]], background: bool) -> list[PendingRead]:
        pending = [PendingRead(key, buf, background=background, future=Future()) for key, buf in reads]
        with self._lock:
            if self._failure is not None:
                raise self._failure
            if background:
                self._queued.extend(pending)
            else:
                self._queued.extendleft(reversed(pending))
            self._wake()
        return pending

    def landed(self, read: PendingRead) -> bool:
        return read.landed

    def cancel(self, read: PendingRead) -> bool:
        with self._lock:
            if read not in self._queued:
                return False
            self._queued.remove(read)
        assert read.future is not None
        read.future.cancel()
        return True

    def promote(self, reads: list[PendingRead]) -> None:
        with self._lock:
            for read in reads:
                read.background = False  # a step waits for it now, queued or in flight
            queued = [read for read in reads if read in self._queued]
            for read in queued:
                self._queued.remove(read)
            self._queued.extendleft(reversed(queued))
            self._wake()

    def close(self) -> None:
        """Wait for the reads in flight (their slots must not be written once their owner frees them); reads
        still queued are withdrawn."""
        with self._lock:
            self._closing = True
            withdrawn = list(self._queued)
            self._queued.clear()
            self._wake()
        for read in withdrawn:
            assert read.future is not None
            read.future.cancel()
        self._thread.join()
        os.close(self._wake_fd)


def queue_depth_from_profile(model: ReadTimeModel | None, block_bytes: int, default: int) -> tuple[int, str]:
    """The queue depth for expert reads, and how it was chosen: the knee of the profile's random-read bandwidth at
    the expert size (the first measured depth reaching KNEE_FLOOR of the best from which the next measured depth
    adds less than KNEE_GAIN), else `default`. Taking the smallest depth within a few percent of the best instead
    would, on a disk whose bandwidth is flat in depth, follow the profile's noise to the deepest queue."""
    if model is None:
        return default, f"default {default} (io_threads): no SSD profile for this disk"
    grid = model.bw.get("randread") or next(iter(model.bw.values()))
    depths = sorted({qd for by_qd in grid.values() for qd in by_qd})
    bandwidth = {qd: model.bandwidth_bytes_per_s(block_bytes, qd) for qd in depths}
    best = max(bandwidth.values())
    candidates = [qd for qd in depths if bandwidth[qd] >= KNEE_FLOOR * best]
    depth = next(
        (qd for qd, deeper in itertools.pairwise(candidates) if bandwidth[deeper] < KNEE_GAIN * bandwidth[qd]),
        candidates[-1],
    )
    return depth, (
        f"profile {model.source}: the knee of the random-read bandwidth at {block_bytes} B, "
        f"{bandwidth[depth] / 1e6:.0f} MB/s at depth {depth} (the next measured depth adds less than "
        f"{KNEE_GAIN - 1:.0%}; best {best / 1e6:.0f} MB/s)"
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
