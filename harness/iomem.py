"""Memory that direct (O_DIRECT) reads land in: huge-page-backed where the kernel grants it.

A direct read DMAs into the caller's pages, and the block layer maps every physically contiguous run
of them to one segment. Base pages (4 KiB) of a fragmented process are rarely contiguous, so a 1 MiB
read needs about 256 segments; a device with a lower limit (virtio-blk allows 254) then gets it as
two requests, and each request costs a device round trip: on the virtio disk this was developed on,
1 MiB reads ran at about 0.85 GB/s from base pages against 2 GB/s from huge pages. Whether fio or the
harness hit that depended on how their allocations happened to fall. So every buffer here is a
private anonymous map aligned to 2 MiB, with transparent huge pages requested (MADV_HUGEPAGE) and
every page touched once, which also makes the memory resident (and counted) from the start.
`huge_bytes` says how much the kernel actually backed with huge pages; results record it.
"""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

HUGE_PAGE_BYTES = 2 * 1024 * 1024  # x86-64 and arm64 (4 KiB granule) transparent huge page size
_THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), or 'unavailable'."""
    try:
        text = _THP_ENABLED.read_text()
    except OSError:
        return "unavailable"
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else "unavailable"


class IoBuffer:
    """`nbytes` of page-aligned memory (`view`, `address`), 2 MiB-aligned and huge-page-backed when granted."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(1, nbytes)
        # The usable range starts on a 2 MiB boundary and spans whole huge pages: the length rounded
        # up to 2 MiB, plus one huge page of slack for the alignment.
        span = -(-self.nbytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
        self._map = mmap.mmap(
            -1,
            span + HUGE_PAGE_BYTES,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,  # shared anonymous memory is shmem: no THP there
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        base = address_of(self._map)
        self._offset = (-base) % HUGE_PAGE_BYTES
        self.address = base + self._offset
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self._map.madvise(mmap.MADV_HUGEPAGE, self._offset, span)
        self.view = memoryview(self._map)[self._offset : self._offset + self.nbytes]
        # Touch every page now: huge pages are allocated at the first fault, and a direct read that
        # faults a page in itself gets whatever page size the fault path picks.
        for page in range(0, self.nbytes, mmap.PAGESIZE):
            self.view[page] = 0

    @property
    def huge_bytes(self) -> int:
        """Bytes of this buffer's mapping backed by transparent huge pages (from /proc/self/smaps)."""
        return anon_huge_bytes(self.address)

    @property
    def huge_page_share(self) -> float:
        """Share of the buffer on huge pages (the mapping's huge pages can cover more than `nbytes`)."""
        return min(1.0, self.huge_bytes / self.nbytes)

    def close(self) -> None:
        self.view.release()
        self._map.close()

    def __enter__(self) -> IoBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def base_page_note(share: float, what: str) -> str | None:
    """The validity note for direct reads into `what` when only `share` of it is on huge pages, else None."""
    if share >= 1.0:
        return None
    return (
        f"{share:.0%} of {what} is on huge pages (transparent huge pages: {thp_mode()}): a direct read into "
        "base pages may reach the device as several requests"
    )


def address_of(region: mmap.mmap) -> int:
    """Address of a map's first byte."""
    view = ctypes.c_char.from_buffer(region)
    try:
        return ctypes.addressof(view)
    finally:
        del view  # an export left alive would keep the map from closing


def anon_huge_bytes(address: int, smaps: str | None = None) -> int:
    """AnonHugePages of the mapping that holds `address`, in bytes, from `smaps` (default: this process's
    /proc/self/smaps); 0 where it cannot tell."""
    if smaps is None:
        try:
            smaps = Path("/proc/self/smaps").read_text()
        except OSError:
            return 0
    inside = False
    for line in smaps.splitlines():
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            start, _, end = head.partition("-")
            try:
                inside = int(start, 16) <= address < int(end, 16)
            except ValueError:
                inside = False
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1]) * 1024
    return 0
