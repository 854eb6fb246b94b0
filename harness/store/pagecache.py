"""The page cache as a measured tier: was a buffered read served by the page cache or by the device?

Two ways, both per page, neither reading the device to decide:

- `read_classified`: a buffered `preadv2(..., RWF_NOWAIT)` first. The kernel copies what the page cache
  holds and stops at the first page it would have to wait for (EAGAIN, or a short count); the rest is then
  read normally, from the device. A hit costs one system call, so every expert read can be classified.
  The refused attempt may start the kernel's readahead for the range, as the blocking read would anyway.
- `resident_pages`: mincore(2) on a read-only mapping of the range: how many of its pages are in the page
  cache now, without reading or faulting them in; the way for runs that map the expert file.

`classification_refused` says why a file's reads cannot be classified (no RWF_NOWAIT on this system, or a
filesystem that refuses it), so that a run with a page-cache tier refuses in one line instead of counting
page-cache hits as SSD reads. tmpfs and ramfs hold every page in memory: there, every read is a hit.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError
from harness.keys import ExpertKey
from harness.store.layout import PackIndex
from harness.store.reader import ExpertReader, IoRecord

PAGE_BYTES = mmap.PAGESIZE
_REFUSED = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)
"""What a kernel or filesystem without buffered RWF_NOWAIT answers (EINVAL before Linux 4.14)."""


@dataclass(frozen=True, slots=True)
class ClassifiedRead:
    """One buffered read of `nbytes`: a prefix of `page_cache_bytes` came from the page cache, the rest from
    the device. The rest is an upper bound on device bytes: pages after the first missing one may have been
    cached too."""

    nbytes: int
    page_cache_bytes: int

    @property
    def hit(self) -> bool:
        """True when the page cache served the whole range (a page-cache tier hit)."""
        return self.page_cache_bytes == self.nbytes

    @property
    def device_bytes(self) -> int:
        return self.nbytes - self.page_cache_bytes


def read_classified(fd: int, buffer: memoryview | bytearray, offset: int) -> ClassifiedRead:
    """Fill `buffer` from `fd` (opened without O_DIRECT) at `offset`, saying which bytes the page cache served."""
    view = memoryview(buffer).cast("B")
    want = len(view)
    nowait = getattr(os, "RWF_NOWAIT", None)
    if nowait is None:
        raise HarnessError("this system has no RWF_NOWAIT reads: page-cache hits cannot be classified")
    try:
        got = os.preadv(fd, [view], offset, nowait)
    except BlockingIOError:
        got = 0
    except OSError as exc:
        if exc.errno in _REFUSED:
            raise HarnessError(f"the filesystem refuses RWF_NOWAIT reads ({exc.strerror}): cannot classify") from None
        raise
    cached = got
    while got < want:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise HarnessError(f"short read: the file ends before byte {offset + want}")
        got += n
    return ClassifiedRead(want, cached)


class PageCacheReader(ExpertReader):
    """Buffered expert reads through the page cache (a page-cache tier), each one classified: its record's
    `page_cache_bytes` say what the page cache served. The file is dropped from the page cache once, when it
    opens (the tier starts empty, as the simulator's model does), and never after a read."""

    def __init__(self, path: Path, index: PackIndex) -> None:
        super().__init__(path, index, "buffered")
        self.engine = "buffered-pagecache"
        self.fallback_reason = None

    def read_into(self, key: ExpertKey, buffer: memoryview) -> IoRecord:
        entry = self.index.entry(*key)
        start = time.perf_counter_ns()
        read = read_classified(self.fd, buffer, entry.offset)
        record = self.complete_read(key, buffer, read.nbytes, start, time.perf_counter_ns())
        return dataclasses.replace(record, page_cache_bytes=read.page_cache_bytes)


def classification_refused(path: str | Path) -> str | None:
    """Why buffered reads of `path` cannot be classified as page cache or device, or None where they can."""
    if getattr(os, "RWF_NOWAIT", None) is None or not hasattr(os, "preadv"):
        return "this system has no preadv2 with RWF_NOWAIT (Linux 4.14 or later)"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return f"cannot open {path}: {exc.strerror}"
    try:
        # At the end of the file: the flag is checked, nothing is read, and no readahead starts (a probe
        # inside the file would start one and so change what it measures).
        os.preadv(fd, [bytearray(1)], os.fstat(fd).st_size, os.RWF_NOWAIT)
    except BlockingIOError:
        pass  # the kernel answered "not cached", so it can be asked
    except OSError as exc:
        if exc.errno in _REFUSED:
            return f"the filesystem of {path} refuses RWF_NOWAIT reads ({exc.strerror})"
        return f"cannot read {path}: {exc.strerror}"
    finally:
        os.close(fd)
    return None


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_pages(fd: int, offset: int, length: int) -> tuple[int, int]:
    """(pages in the page cache, pages) of the file range [offset, offset + length), by mincore(2)."""
    if length <= 0:
        return 0, 0
    start = offset - offset % PAGE_BYTES
    span = offset + length - start
    pages = -(-span // PAGE_BYTES)
    address = _libc.mmap(None, span, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if address == _MAP_FAILED:
        code = ctypes.get_errno()
        raise HarnessError(f"cannot map the range at {offset} for mincore: {os.strerror(code)}")
    try:
        vector = ctypes.create_string_buffer(pages)
        if _libc.mincore(address, span, vector) != 0:
            code = ctypes.get_errno()
            raise HarnessError(f"mincore failed at {offset}: {os.strerror(code)}")
        return sum(b & 1 for b in vector.raw), pages
    finally:
        _libc.munmap(address, span)
