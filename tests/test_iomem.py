"""I/O buffers: 2 MiB-aligned, resident, and honest about how much of them is on huge pages."""

from __future__ import annotations

import mmap

from harness.iomem import HUGE_PAGE_BYTES, IoBuffer, anon_huge_bytes, thp_mode

SMAPS = """\
55d0c0000000-55d0c0200000 r--p 00000000 fe:01 1234    /usr/bin/python3.11
Size:               2048 kB
AnonHugePages:         0 kB
7f0000000000-7f0000600000 rw-p 00000000 00:00 0
Size:               6144 kB
Rss:                6144 kB
AnonHugePages:      4096 kB
VmFlags: rd wr mr mw me ac hg
7f0000600000-7f0000601000 rw-p 00000000 00:00 0
AnonHugePages:         0 kB
"""


def test_huge_page_bytes_are_read_from_the_mapping_that_holds_the_address() -> None:
    assert anon_huge_bytes(0x7F0000000000, SMAPS) == 4096 * 1024
    assert anon_huge_bytes(0x7F00005FFFFF, SMAPS) == 4096 * 1024
    assert anon_huge_bytes(0x7F0000600000, SMAPS) == 0  # the next mapping
    assert anon_huge_bytes(0x1000, SMAPS) == 0  # in no mapping


def test_buffer_is_aligned_resident_and_reports_its_huge_pages() -> None:
    size = 3 * HUGE_PAGE_BYTES + mmap.PAGESIZE
    with IoBuffer(size) as buffer:
        assert buffer.address % HUGE_PAGE_BYTES == 0 and len(buffer.view) == size
        buffer.view[-1] = 7  # the whole range is writable
        assert buffer.huge_bytes % HUGE_PAGE_BYTES == 0 and buffer.huge_bytes <= size + HUGE_PAGE_BYTES
        if thp_mode() == "never":
            assert buffer.huge_bytes == 0
    assert thp_mode() in ("always", "madvise", "never", "unavailable")
