"""Process hygiene: children that die with their parent, SIGTERM treated as an interrupt, one writer per
run folder, and no partial files left behind.

- `child_preexec`: the `preexec_fn` of every child the harness starts (a budgeted run's re-executed self,
  a sweep cell): the kernel sends the child SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG), so a
  parent killed even by SIGKILL never leaves a cell measuring.
- `sigterm_as_interrupt`: inside it, SIGTERM raises KeyboardInterrupt, so the `finally` blocks that stop
  children, remove cgroups and partial files run for SIGTERM as they do for Ctrl-C.
- `claim_run_dir`: an exclusive, non-blocking fcntl lock on `<run_dir>/.lock` for the whole run; a second
  writer of the same run is refused with a one-line error. A parent that holds the lock for a child it
  starts names the folder in HARNESS_RUN_LOCK_HELD so the child does not refuse itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from harness.errors import HarnessError

LOCK_FILE = ".lock"
LOCK_HELD_ENV = "HARNESS_RUN_LOCK_HELD"
"""The run folder whose lock the parent holds for this process (set by the parent)."""
BUDGET_CHILD_ENV = "HARNESS_BUDGET_CHILD"
"""Set in a budgeted run's re-executed child: the child never re-executes itself again."""
PARTIAL_PATTERNS = ("*.partial", "*.tmp", ".result.json.*", ".spec-*.json")
"""Files that exist only while something is being written; removed from a run folder on every way out."""
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# How long a stopped child gets to exit after SIGTERM before it is killed (seconds).
STOP_GRACE_S = 10.0


class RunClaimed(HarnessError):
    """Another process holds the run folder's lock."""


def child_preexec(parent_pid: int | None = None) -> Callable[[], None]:
    """A `preexec_fn` that makes the child get SIGTERM when its parent dies (and exit if it already has)."""
    parent_pid = parent_pid or os.getpid()

    def preexec() -> None:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def start_child(argv: Sequence[str], env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen:
    """Popen a child that dies with this process."""
    return subprocess.Popen(list(argv), env=env, preexec_fn=child_preexec(), **kwargs)


def stop_child(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> int:
    """SIGTERM, then SIGKILL after `grace_s`; returns the exit status."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt (main thread only; elsewhere a no-op)."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def remove_partials(folder: Path) -> None:
    for pattern in PARTIAL_PATTERNS:
        for path in Path(folder).glob(pattern):
            with contextlib.suppress(OSError):
                path.unlink()


def lock_held_env(run_dir: Path) -> dict[str, str]:
    """The environment of a child that writes `run_dir` under this process's lock."""
    return {**os.environ, LOCK_HELD_ENV: str(Path(run_dir).resolve())}


@contextlib.contextmanager
def claim_run_dir(run_dir: Path) -> Iterator[bool]:
    """Hold `<run_dir>/.lock` for the block; refuse (HarnessError) when another process holds it. Yields
    whether the claim was inherited from a parent that holds the lock (a sweep, a budgeted run's parent),
    which has then decided that this run is to be written. Partial files in the folder are removed when
    the block ends, however it ends."""
    run_dir = Path(run_dir)
    if os.environ.get(LOCK_HELD_ENV) == str(run_dir.resolve()):
        try:
            yield True
        finally:
            remove_partials(run_dir)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            raise RunClaimed(
                f"run {run_dir.name} in {run_dir.parent} is being written by pid {holder}; "
                "wait for it or use another --results folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield False
        finally:
            remove_partials(run_dir)
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)
