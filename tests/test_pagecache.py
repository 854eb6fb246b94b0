"""The page cache as a measured tier: buffered reads classified by RWF_NOWAIT, ranges by mincore, on a real
file whose pages are dropped (fadvise DONTNEED) and brought back by reading; tmpfs is always a hit."""

import os
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.store.pagecache import PAGE_BYTES, classification_refused, read_classified, resident_pages

MIB = 1 << 20


def filesystem_type(path: Path) -> str:
    """The type of the mount that holds `path` (the longest mount point that is a prefix of it)."""
    best, kind = "", "unknown"
    resolved = str(path.resolve())
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        point = fields[1].replace("\\040", " ")
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def dropped_file(folder: Path, size: int = 4 * MIB) -> tuple[Path, bytes]:
    """A file of random bytes, written back and dropped from the page cache."""
    data = os.urandom(size)
    path = folder / "experts.bin"
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    return path, data


def test_reads_on_a_disk_file_are_classified_exactly(tmp_path):
    kind = filesystem_type(tmp_path)
    if kind in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is on {kind}: its pages cannot be dropped (set TMPDIR to a disk filesystem)")
    path, data = dropped_file(tmp_path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: only what is read gets cached
        if resident_pages(fd, 0, 4 * MIB) != (0, 4 * MIB // PAGE_BYTES):
            pytest.skip(f"fadvise DONTNEED did not drop the file's pages on {kind}")
        assert classification_refused(path) is None
        assert resident_pages(fd, 0, 4 * MIB) == (0, 4 * MIB // PAGE_BYTES)  # the probe read nothing
        buffer = bytearray(MIB)
        cold = read_classified(fd, buffer, MIB)
        assert (cold.nbytes, cold.page_cache_bytes, cold.device_bytes, cold.hit) == (MIB, 0, MIB, False)
        assert bytes(buffer) == data[MIB : 2 * MIB]
        assert resident_pages(fd, MIB, MIB) == (MIB // PAGE_BYTES,) * 2
        assert resident_pages(fd, 2 * MIB, MIB) == (0, MIB // PAGE_BYTES)
        warm = read_classified(fd, buffer, MIB)
        assert (warm.page_cache_bytes, warm.hit) == (MIB, True) and bytes(buffer) == data[MIB : 2 * MIB]
        # One cached page, then an uncached one: the cached prefix is counted, the rest is the device's.
        os.pread(fd, PAGE_BYTES, 3 * MIB)
        assert resident_pages(fd, 3 * MIB + 100, 2 * PAGE_BYTES) == (1, 3)
        part = bytearray(2 * PAGE_BYTES)
        mixed = read_classified(fd, part, 3 * MIB)
        assert (mixed.page_cache_bytes, mixed.device_bytes, mixed.hit) == (PAGE_BYTES, PAGE_BYTES, False)
        assert bytes(part) == data[3 * MIB : 3 * MIB + 2 * PAGE_BYTES]
        with pytest.raises(HarnessError, match="the file ends before byte"):
            read_classified(fd, bytearray(2 * PAGE_BYTES), 4 * MIB - PAGE_BYTES)
    finally:
        os.close(fd)


def test_tmpfs_is_always_cached_and_classified_or_refused():
    shm = Path("/dev/shm")
    if not shm.is_dir() or filesystem_type(shm) != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    folder = shm / f"harness-pagecache-{os.getpid()}"
    folder.mkdir()
    try:
        path, data = dropped_file(folder, MIB)
        fd = os.open(path, os.O_RDONLY)
        try:
            assert resident_pages(fd, 0, MIB) == (MIB // PAGE_BYTES,) * 2  # dropping does not drop tmpfs pages
            refused = classification_refused(path)
            if refused is not None:  # shmem refuses RWF_NOWAIT on some kernels: a run must say so
                assert refused.endswith("refuses RWF_NOWAIT reads (Operation not supported)")
                with pytest.raises(HarnessError, match="refuses RWF_NOWAIT reads"):
                    read_classified(fd, bytearray(MIB), 0)
            else:
                buffer = bytearray(MIB)
                assert read_classified(fd, buffer, 0).hit and bytes(buffer) == data
        finally:
            os.close(fd)
    finally:
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()


def test_no_rwf_nowait_is_a_one_line_refusal(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    assert classification_refused(tmp_path / "missing").startswith("cannot open")
    monkeypatch.delattr(os, "RWF_NOWAIT")
    assert "RWF_NOWAIT" in classification_refused(path)
    with pytest.raises(HarnessError, match="no RWF_NOWAIT"):
        read_classified(0, bytearray(1), 0)
