"""Reads expert blobs from the packed file into aligned memory: O_DIRECT, or buffered with the file
dropped from the page cache where O_DIRECT is impossible (tmpfs, some filesystems), so that a read
counted as an SSD read never comes from the page cache."""

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
from harness.store.layout import PackIndex

log = logging.getLogger(__name__)
IoEngine = Literal["direct", "buffered-dropped"]


@dataclass(frozen=True, slots=True)
class IoRecord:
    key: ExpertKey
    nbytes: int
    start_ns: int
    end_ns: int
    """perf_counter_ns clock, the clock of the engine's timings."""


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
    """One open descriptor on experts.bin; `read_into` is thread-safe (positional reads)."""

    def __init__(self, path: Path, index: PackIndex, engine: Literal["auto", "direct", "buffered"] = "auto") -> None:
        self.path, self.index = Path(path), index
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
        if got < 0:
            raise HarnessError(f"reading layer {key[0]} expert {key[1]} from {self.path} failed: {os.strerror(-got)}")
        if got != len(buffer):
            raise HarnessError(
                f"short read of layer {key[0]} expert {key[1]} from {self.path}: {got} bytes of "
                f"{len(buffer)}; the expert file is truncated, re-run `harness model pack`"
            )
        if self.engine == "buffered-dropped":
            self.drop_cache(self.index.entry(*key).offset, len(buffer))
        return IoRecord(key, got, start_ns, end_ns)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
