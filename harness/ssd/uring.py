"""io_uring through its raw system calls (ctypes): one ring, read/write submission, completion reaping.

The kernel ABI (include/uapi/linux/io_uring.h) is stable and small: `io_uring_setup` returns a ring
file descriptor and the offsets of its shared submission and completion rings, which are mapped
into this process; a request is a 64-byte submission queue entry (SQE), a result a 16-byte
completion queue entry (CQE), and `io_uring_enter` submits and waits. Driving it directly needs no
binding package (none is both maintained and installable everywhere this runs). Without SQ polling
every submission and every wait is a system call, which orders the ring memory for the kernel.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from functools import cache

from harness.iomem import address_of

# System call numbers: the unified table, the same on every architecture since Linux 5.1 (not alpha).
_SYS_IO_URING_SETUP = 425
_SYS_IO_URING_ENTER = 426
_IORING_OFF_SQ_RING = 0
_IORING_OFF_CQ_RING = 0x8000000
_IORING_OFF_SQES = 0x10000000
_IORING_FEAT_SINGLE_MMAP = 1 << 0
_IORING_SETUP_COOP_TASKRUN = 1 << 8
_IORING_SETUP_SINGLE_ISSUER = 1 << 12
_IORING_SETUP_DEFER_TASKRUN = 1 << 13
_IORING_ENTER_GETEVENTS = 1 << 0
OP_READ = 22  # IORING_OP_READ (Linux 5.6): one buffer, no iovec, as fio issues it
OP_WRITE = 23  # IORING_OP_WRITE
# struct io_uring_sqe: opcode u8, flags u8, ioprio u16, fd s32, off u64, addr u64, len u32,
# rw_flags u32, user_data u64, buf_index u16, personality u16, splice_fd_in s32, 16 bytes padding.
_SQE = struct.Struct("<BBHiQQIIQHHi16x")
_CQE = struct.Struct("<QiI")  # struct io_uring_cqe: user_data u64, res s32, flags u32


class _SqOffsets(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_uint32) for name in ("head", "tail", "ring_mask", "ring_entries", "flags", "dropped")),
        ("array", ctypes.c_uint32),
        ("resv1", ctypes.c_uint32),
        ("user_addr", ctypes.c_uint64),
    ]


class _CqOffsets(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_uint32) for name in ("head", "tail", "ring_mask", "ring_entries", "overflow", "cqes")),
        ("flags", ctypes.c_uint32),
        ("resv1", ctypes.c_uint32),
        ("user_addr", ctypes.c_uint64),
    ]


class _Params(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_uint32) for name in ("sq_entries", "cq_entries", "flags", "sq_thread_cpu")),
        *((name, ctypes.c_uint32) for name in ("sq_thread_idle", "features", "wq_fd")),
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", _SqOffsets),
        ("cq_off", _CqOffsets),
    ]


assert ctypes.sizeof(_Params) == 120, "struct io_uring_params is 120 bytes"

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


class Ring:
    """One io_uring instance with `entries` submission slots (the kernel rounds up to a power of two).

    Use: `prepare` requests (at most `entries` not yet submitted), `submit(wait=n)` hands them to the
    kernel and waits until n completions are ready, `reap()` returns the ready (user_data, result)
    pairs; `close()` (or the context manager) cancels whatever is still in flight.
    """

    def __init__(self, entries: int) -> None:
        params = _Params()
        # As fio sets up its rings (Linux 6.1+): one thread submits, and completions are processed when
        # it waits, not by interrupting it. Older kernels refuse the flags; the ring then works without.
        params.flags = _IORING_SETUP_COOP_TASKRUN | _IORING_SETUP_SINGLE_ISSUER | _IORING_SETUP_DEFER_TASKRUN
        fd = _syscall(_SYS_IO_URING_SETUP, ctypes.c_uint(entries), ctypes.byref(params))
        if fd < 0 and ctypes.get_errno() == errno.EINVAL:
            params = _Params()
            fd = _syscall(_SYS_IO_URING_SETUP, ctypes.c_uint(entries), ctypes.byref(params))
        self.fd = _check(fd, "io_uring_setup")
        self._maps: list[mmap.mmap] = []
        try:
            self._map_rings(params)
        except BaseException:
            self.close()
            raise

    def _map(self, size: int, offset: int) -> mmap.mmap:
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        region = mmap.mmap(self.fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self._maps.append(region)
        return region

    def _map_rings(self, p: _Params) -> None:
        sq_size = p.sq_off.array + p.sq_entries * 4
        cq_size = p.cq_off.cqes + p.cq_entries * _CQE.size
        if p.features & _IORING_FEAT_SINGLE_MMAP:
            sq = cq = self._map(max(sq_size, cq_size), _IORING_OFF_SQ_RING)
        else:
            sq = self._map(sq_size, _IORING_OFF_SQ_RING)
            cq = self._map(cq_size, _IORING_OFF_CQ_RING)
        self._sqes = self._map(p.sq_entries * _SQE.size, _IORING_OFF_SQES)
        self.entries = p.sq_entries
        # ctypes views of the shared counters; they pin their maps until close() drops them.
        self._sq_tail = ctypes.c_uint32.from_buffer(sq, p.sq_off.tail)
        self._sq_mask = p.sq_entries - 1  # ring_mask is entries - 1: entries is a power of two
        # Slot i of the indirection array names SQE i once and for all: SQEs are used in ring order.
        array = (ctypes.c_uint32 * p.sq_entries).from_buffer(sq, p.sq_off.array)
        array[:] = range(p.sq_entries)
        del array
        self._cq = cq
        self._cq_head = ctypes.c_uint32.from_buffer(cq, p.cq_off.head)
        self._cq_tail = ctypes.c_uint32.from_buffer(cq, p.cq_off.tail)
        self._cq_mask = p.cq_entries - 1
        self._cqes_offset = p.cq_off.cqes
        self._tail = self._sq_tail.value  # local tail: prepared requests, published by submit()
        self._unsubmitted = 0

    def prepare(self, opcode: int, fd: int, address: int, length: int, offset: int, user_data: int) -> None:
        """Fill the next SQE (a read or write of `length` bytes at file `offset` into/from `address`)."""
        if self._unsubmitted == self.entries:
            raise RuntimeError("io_uring submission queue full: submit() first")
        index = self._tail & self._sq_mask
        _SQE.pack_into(self._sqes, index * _SQE.size, opcode, 0, 0, fd, offset, address, length, 0, user_data, 0, 0, 0)
        self._tail = (self._tail + 1) & 0xFFFFFFFF
        self._unsubmitted += 1

    def submit(self, wait: int = 0, post: bool = False) -> None:
        """Submit every prepared request and wait until at least `wait` completions are ready; `post` with
        no wait makes the kernel post the completions already done (deferred to the next wait otherwise)."""
        self._sq_tail.value = self._tail
        while True:
            flags = _IORING_ENTER_GETEVENTS if wait or post else 0
            ret = _syscall(_SYS_IO_URING_ENTER, self.fd, self._unsubmitted, wait, flags, None, 0)
            if ret >= 0:
                self._unsubmitted -= ret
                if not self._unsubmitted:
                    return
                continue  # the kernel took part of the batch: hand it the rest
            err = ctypes.get_errno()
            if err != errno.EINTR:
                raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
            # A signal interrupted the wait: retry (for SIGINT, Python raises KeyboardInterrupt here first).

    def reap(self) -> list[tuple[int, int]]:
        """The ready completions as (user_data, result): result is bytes moved, or -errno."""
        head, tail = self._cq_head.value, self._cq_tail.value
        done = []
        while head != tail:
            user_data, result, _ = _CQE.unpack_from(self._cq, self._cqes_offset + (head & self._cq_mask) * _CQE.size)
            done.append((user_data, result))
            head = (head + 1) & 0xFFFFFFFF
        self._cq_head.value = head
        return done

    def close(self) -> None:
        """Close the ring: the kernel cancels and waits for requests still in flight."""
        if self.fd < 0:
            return
        os.close(self.fd)
        self.fd = -1
        for name in ("_sq_tail", "_cq_head", "_cq_tail"):  # the views pin the maps: drop them first
            self.__dict__.pop(name, None)
        for region in self._maps:
            region.close()
        self._maps.clear()

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@cache
def unavailable_reason() -> str | None:
    """None when io_uring reads work here, else why not (old kernel, seccomp, io_uring_disabled)."""
    try:
        with Ring(1) as ring:
            buf = mmap.mmap(-1, mmap.PAGESIZE)
            read_fd = os.open("/proc/self/stat", os.O_RDONLY)
            try:
                ring.prepare(OP_READ, read_fd, address_of(buf), mmap.PAGESIZE, 0, 7)
                ring.submit(wait=1)
                ((user_data, result),) = ring.reap()
            finally:
                os.close(read_fd)
                buf.close()
    except OSError as exc:
        return f"io_uring unusable here ({exc.strerror or exc})"
    except ValueError as exc:
        return f"io_uring unusable here ({exc})"
    if user_data != 7 or result <= 0:
        return f"io_uring test read failed here (result {result})"
    return None
