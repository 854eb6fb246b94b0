"""The thing a profile reads: a test file it creates on the target filesystem, or a raw device read-only.

Every open goes through `open_target`, the one place that decides the flags: a write open is
only ever granted for a regular file (checked before and after the open), so nothing can write
to a block device. The test file is filled with random bytes through ordinary writes, so it is
neither sparse nor compressible, and `remove_test_file` runs in the caller's `finally`.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

import numpy as np

from harness.errors import HarnessError
from harness.ssd.devices import free_bytes_in, probe_o_direct
from harness.units import format_bytes

log = logging.getLogger(__name__)

TEST_FILE_PREFIX = ".harness-ssd-test-"
_TEST_FILE_RE = re.compile(rf"^{re.escape(TEST_FILE_PREFIX)}(\d+)-[0-9a-f]+\.bin$")
# Filled in 8 MiB writes: large enough to stream, small enough to keep memory flat.
FILL_CHUNK_BYTES = 8 * 1024 * 1024
# Space left free beyond the test file, so the profile never fills a filesystem (bytes).
FREE_MARGIN_BYTES = 256 * 1024 * 1024


def open_target(path: str | Path, *, write: bool, direct: bool) -> int:
    """Open for the profiler's I/O. Write opens are refused for anything but a regular file."""
    flags = (os.O_WRONLY if write else os.O_RDONLY) | (os.O_DIRECT if direct else 0)
    if write:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise AssertionError(f"refusing to open {path} for writing: not a regular file")
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    if write and not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AssertionError(f"refusing to write to {path}: not a regular file")
    return fd


def drop_cache(fd: int, *, flush: bool) -> None:
    """Evict the file's pages from the page cache (flush dirty pages first when `flush`)."""
    if flush:
        os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def drop_cache_path(path: str | Path, *, flush: bool) -> None:
    fd = open_target(path, write=False, direct=False)
    try:
        drop_cache(fd, flush=flush)
    finally:
        os.close(fd)


def check_folder(folder: Path, size_bytes: int, *, direct_required: bool) -> bool:
    """Refuse a folder the profile cannot use; return whether O_DIRECT works there."""
    if not folder.exists():
        raise HarnessError(f"--path {folder} does not exist: create the folder first or name another")
    if not folder.is_dir():
        raise HarnessError(f"--path {folder} is not a folder: name the folder to hold the test file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise HarnessError(f"no permission to create files in {folder}: choose a writable folder or fix its mode")
    free = free_bytes_in(folder)
    if free < size_bytes + FREE_MARGIN_BYTES:
        raise HarnessError(
            f"too little free space in {folder}: {format_bytes(free)} free, the test file needs "
            f"{format_bytes(size_bytes)} plus {format_bytes(FREE_MARGIN_BYTES)} margin; use a smaller --size"
        )
    ok, note = probe_o_direct(folder)
    if not ok and direct_required:
        raise HarnessError(f"the filesystem of {folder} does not support O_DIRECT ({note}); use --direct auto")
    return ok


def scratch_path(folder: Path) -> Path:
    return folder / f"{TEST_FILE_PREFIX}{os.getpid()}-{os.urandom(4).hex()}.bin"


def create_test_file(path: Path, size_bytes: int, seed: int = 0) -> None:
    """Write `size_bytes` of random data to a new file at `path` with normal writes, then fsync.

    The caller owns removal (also on failure): it knows the path before this starts.
    """
    rng = np.random.default_rng(seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        written = 0
        while written < size_bytes:
            chunk = rng.bytes(min(FILL_CHUNK_BYTES, size_bytes - written))
            view = memoryview(chunk)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            written += len(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("created test file %s (%s)", path, format_bytes(size_bytes))


def remove_test_file(path: Path) -> None:
    try:
        path.unlink()
        log.info("removed test file %s", path)
    except FileNotFoundError:
        pass


def remove_stale_test_files(folder: Path) -> list[Path]:
    """Remove test files left by profiles whose process no longer exists (killed with SIGKILL)."""
    removed = []
    for entry in folder.iterdir():
        match = _TEST_FILE_RE.match(entry.name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # its profile is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's live process
        log.warning("removing stale test file %s left by a killed profile", entry)
        remove_test_file(entry)
        removed.append(entry)
    return removed


def check_raw_device(device: str) -> int:
    """Refuse a --device that is missing, not a block device or unreadable; return its size in bytes."""
    if not os.path.exists(device):
        raise HarnessError(f"--device {device} does not exist")
    if not stat.S_ISBLK(os.stat(device).st_mode):
        raise HarnessError(f"--device {device} is not a block device: use --path for a folder")
    if not os.access(device, os.R_OK):
        raise HarnessError(f"no permission to read {device}: run as a user in the disk group or as root")
    fd = open_target(device, write=False, direct=False)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
