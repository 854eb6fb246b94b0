"""The ctypes io_uring ring: byte-exact reads and writes at the offsets asked, errors as OSError."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import pytest

from harness.iomem import address_of
from harness.ssd import uring
from harness.ssd.target import probe_o_direct

pytestmark = pytest.mark.skipif(uring.unavailable_reason() is not None, reason=str(uring.unavailable_reason()))

BLOCK = 64 * 1024


def _file(tmp_path: Path, blocks: int) -> tuple[Path, bytes]:
    data = os.urandom(blocks * BLOCK)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("direct", [False, True])
def test_reads_land_byte_exact_in_their_buffers(tmp_path: Path, direct: bool) -> None:
    if direct and not probe_o_direct(tmp_path)[0]:
        pytest.skip("no O_DIRECT on the test folder's filesystem")
    path, data = _file(tmp_path, 8)
    blocks = [5, 0, 7, 2]  # out of order, one request per buffer slot
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    buffers = mmap.mmap(-1, BLOCK * len(blocks))
    try:
        base = address_of(buffers)
        with uring.Ring(4) as ring:
            assert ring.entries == 4
            for slot, block in enumerate(blocks):
                ring.prepare(uring.OP_READ, fd, base + slot * BLOCK, BLOCK, block * BLOCK, 100 + slot)
            ring.submit(wait=len(blocks))
            done = ring.reap()
            while len(done) < len(blocks):  # wait=n guarantees n ready; reap them all
                ring.submit(wait=1)
                done += ring.reap()
        assert sorted(done) == [(100 + slot, BLOCK) for slot in range(len(blocks))]
        for slot, block in enumerate(blocks):
            assert buffers[slot * BLOCK : (slot + 1) * BLOCK] == data[block * BLOCK : (block + 1) * BLOCK]
    finally:
        os.close(fd)
        buffers.close()


def test_writes_reach_the_file_and_errors_come_back_as_negative_results(tmp_path: Path) -> None:
    path, data = _file(tmp_path, 2)
    payload = os.urandom(BLOCK)
    buffer = mmap.mmap(-1, BLOCK)
    buffer[:] = payload
    fd = os.open(path, os.O_RDWR)
    try:
        with uring.Ring(2) as ring:
            ring.prepare(uring.OP_WRITE, fd, address_of(buffer), BLOCK, BLOCK, 1)
            ring.prepare(uring.OP_READ, 987654, address_of(buffer), BLOCK, 0, 2)  # not an open fd
            ring.submit(wait=2)
            results = dict(ring.reap())
        assert results == {1: BLOCK, 2: -errno.EBADF}
    finally:
        os.close(fd)
        buffer.close()
    assert path.read_bytes() == data[:BLOCK] + payload


def test_a_full_submission_queue_is_refused_not_overwritten() -> None:
    buffer = mmap.mmap(-1, 4096)
    fd = os.open("/proc/self/stat", os.O_RDONLY)
    try:
        with uring.Ring(1) as ring:
            ring.prepare(uring.OP_READ, fd, address_of(buffer), 4096, 0, 1)
            with pytest.raises(RuntimeError, match="submission queue full"):
                ring.prepare(uring.OP_READ, fd, address_of(buffer), 4096, 0, 2)
            ring.submit(wait=1)
            assert [user_data for user_data, _ in ring.reap()] == [1]
    finally:
        os.close(fd)
        buffer.close()
