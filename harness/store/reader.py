"""Reads expert blobs from the packed file into aligned memory: O_DIRECT, or buffered with the file
dropped from the page cache where O_DIRECT is impossible (tmpfs, some filesystems), so that a read
counted as an SSD read never comes from the page cache. Every read is verified against the index's
checksum before it returns (`harness.store.checksum.verify_expert`); `verify_expert_file` checks a
whole file once per process."""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from harness.errors import HarnessError
from harness.iomem import IoBuffer
from harness.keys import ExpertKey
from harness.store.checksum import REPACK, check_extent, verify_expert
from harness.store.layout import PackIndex

log = logging.getLogger(__name__)
IoEngine = Literal["direct", "buffered-dropped", "buffered-pagecache"]


@dataclass(frozen=True, slots=True)
class IoRecord:
    key: ExpertKey
    nbytes: int
    start_ns: int
    end_ns: int
    """perf_counter_ns clock, the clock of the engine's timings."""
    page_cache_bytes: int = 0
    """Bytes of the read the page cache served (a classified buffered read, `harness.store.pagecache`)."""

    @property
    def device_bytes(self) -> int:
        """Bytes the device read: all of them, but for what the page cache served."""
        return self.nbytes - self.page_cache_bytes


class AlignedPool:
    """One `IoBuffer` (2 MiB-aligned, huge-page-backed where granted, resident from the start) cut into
    equal slots, allocated once (no allocation per miss)."""

    def __init__(self, slots: int, stride: int) -> None:
        self.slots, self.stride = slots, stride
        self._buffer = IoBuffer(slots * stride)
        self.view = self._buffer.view
        self.huge_page_share = self._buffer.huge_page_share
        """Share of the slot memory the kernel backed with huge pages when the pool was made."""

    def slot(self, index: int) -> memoryview:
        return self.view[index * self.stride : (index + 1) * self.stride]

    @property
    def nbytes(self) -> int:
        return self.slots * self.stride


class ExpertReader:
    """One open descriptor on experts.bin; `read_into` is thread-safe (positional reads). The file's size
    and the index's entries are checked when it opens; each read's bytes when they arrive. `remedy` ends
    the error message of a failed check."""

    def __init__(
        self,
        path: Path,
        index: PackIndex,
        engine: Literal["auto", "direct", "buffered"] = "auto",
        remedy: str = REPACK,
    ) -> None:
        self.path, self.index, self.remedy = Path(path), index, remedy
        if not self.path.is_file():
            raise HarnessError(f"expert file {self.path} does not exist; run `harness model pack` first")
        self.fd = -1
        self.engine: IoEngine = "direct"
        self.fallback_reason: str | None = None
        if engine in ("auto", "direct"):
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            except OSError as exc:
                if engine == "direct" or exc.errno != errno.EINVAL:
                    raise HarnessError(
                        f"cannot open {self.path} with O_DIRECT ({exc.strerror}); the filesystem does "
                        "not support direct I/O: use --io-engine buffered or another path"
                    ) from None
                self.fallback_reason = f"O_DIRECT refused by the filesystem ({exc.strerror})"
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_RDONLY)
            self.engine = "buffered-dropped"
            self.fallback_reason = self.fallback_reason or "buffered reads requested"
            self.drop_cache()
        try:
            check_extent(self.path, index, os.fstat(self.fd).st_size, remedy)
        except HarnessError:
            self.close()
            raise

    def drop_cache(self, offset: int = 0, length: int = 0) -> None:
        """Evict (part of) the file from the page cache so the next read goes to the device."""
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)

    def read_into(self, key: ExpertKey, buffer: memoryview) -> IoRecord:
        entry = self.index.entry(*key)
        start = time.perf_counter_ns()
        got = os.preadv(self.fd, [buffer], entry.offset)
        return self.complete_read(key, buffer, got, start, time.perf_counter_ns())

    def complete_read(self, key: ExpertKey, buffer: memoryview, got: int, start_ns: int, end_ns: int) -> IoRecord:
        """Every expert read ends here, whatever issued it (`read_into`, or the runtime's io_uring reads):
        `got` is the bytes read or -errno. The checks after a read go here, once for every backend."""
        entry = self.index.entry(*key)
        if got < 0:
            raise HarnessError(f"reading layer {key[0]} expert {key[1]} from {self.path} failed: {os.strerror(-got)}")
        if got != len(buffer):
            raise HarnessError(
                f"{self.path}: short read of layer {key[0]} expert {key[1]} at offset {entry.offset}: {got} bytes "
                f"of {len(buffer)}; the expert file was truncated, {self.remedy}"
            )
        if self.engine == "buffered-dropped":
            self.drop_cache(entry.offset, len(buffer))
        verify_expert(self.path, self.index, entry, buffer, self.remedy)
        return IoRecord(key, got, start_ns, end_ns)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_verified: set[tuple[object, ...]] = set()
"""Files this process verified in full, by identity: device, inode, size, mtime and ctime (any write
through the filesystem changes ctime, so a file changed since is checked again) and its index."""


def verify_expert_file(path: Path, index: PackIndex, remedy: str = REPACK) -> None:
    """Read every blob of `path` (in file order, O_DIRECT where allowed, so the page cache is not filled)
    and verify it; once per process for an unchanged file. Raises the one-line HarnessError of the first
    entry that fails."""
    stat = os.stat(path)
    identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, index.experts_digest())
    if identity in _verified:
        return
    reader = ExpertReader(path, index, "auto", remedy)
    try:
        buffer = IoBuffer(index.stride_bytes)
        for entry in sorted(index.entries, key=lambda e: e.offset):
            reader.read_into((entry.layer, entry.expert), buffer.view)
    finally:
        reader.close()
    _verified.add(identity)
