"""Where the harness writes: output paths checked before the work starts, so a finished measurement is never lost
to a bad `--out`, and the harness's own cache folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from harness.errors import HarnessError


def harness_cache_dir() -> Path:
    """The harness's own cache folder: `HARNESS_CACHE`, else `$XDG_CACHE_HOME/harness`, else ~/.cache/harness."""
    explicit = os.environ.get("HARNESS_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "harness"


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _probe_writable(folder: Path, path: Path, what: str) -> None:
    """Create and remove a file in `folder`: the only test that also sees read-only mounts and root's limits."""
    if not folder.is_dir():
        raise HarnessError(f"{what} {path}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".harness-probe-", dir=folder)
    except OSError as exc:
        raise HarnessError(
            f"{what} {path} cannot be written: no file can be created in {folder} ({exc.strerror or exc})"
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: Path, what: str = "output") -> Path:
    """Refuse a file path that is a folder or whose folder cannot be created or written to."""
    path = Path(path)
    if path.is_dir():
        raise HarnessError(f"{what} {path} is a folder: name a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise HarnessError(f"{what} {path} exists and is not writable")
    _probe_writable(_nearest_existing(path.parent), path, what)
    return path


def check_output_dir(path: Path, what: str = "output folder") -> Path:
    """Refuse a folder path that is a file or that cannot be created or written to."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HarnessError(f"{what} {path} is a file: name a folder")
    _probe_writable(_nearest_existing(path), path, what)
    return path
