"""RAM budget enforcement: a memory cgroup (v2 `memory.max` or v1 `memory.limit_in_bytes`) or accounting only.

The budget is the memory the whole inference process may use, page cache included. Where the machine
lets us, the process runs inside a memory cgroup whose limit is the budget, so the kernel charges
the page cache of expert reads to it and reclaims (or OOM-kills) at the limit. Where it does not,
the result says `accounting-only` and the engine must bypass the page cache (O_DIRECT).

Two ways into a cgroup:

- `enforce_budget(limit)`: called at the very start of `harness run`; moves the *current* process
  into a fresh child cgroup unless it already runs under an equal or tighter limit (as it does when
  the sweep runner started it inside the cell's cgroup).
- `CellCgroup`: used by the sweep runner; creates the cgroup first and prefixes the cell's command
  so that the child enters it before `exec`, which charges everything the cell ever allocates.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import psutil

log = logging.getLogger(__name__)

Mode = Literal["cgroup-v2", "cgroup-v1", "accounting-only"]

# v1 reports "no limit" as the largest page-aligned signed 64-bit value (9223372036854771712).
_V1_UNLIMITED = 2**62
# A limit written to v1 is rounded to whole pages (4096 bytes) by the kernel, so a read-back limit
# may differ from the request by less than one page.
_PAGE_BYTES = 4096
_PROC_CGROUP = Path("/proc/self/cgroup")
_MOUNTINFO = Path("/proc/self/mountinfo")
_DROP_CACHES = Path("/proc/sys/vm/drop_caches")
CHILD_PREFIX = "harness-"
# How long removing a cell's cgroup waits for its killed processes to exit (seconds), and how often it
# tries again meanwhile.
_REMOVE_TIMEOUT_S = 10.0
_REMOVE_POLL_S = 0.01


@dataclass(frozen=True)
class CgroupHierarchy:
    """Where this process's memory cgroup lives: the version and the folder under /sys/fs/cgroup."""

    version: Literal[1, 2]
    mount: Path  # mount point of the hierarchy that carries the memory controller
    path: Path  # this process's cgroup folder inside that mount

    @property
    def mode(self) -> Mode:
        return "cgroup-v2" if self.version == 2 else "cgroup-v1"

    @property
    def limit_file(self) -> str:
        return "memory.max" if self.version == 2 else "memory.limit_in_bytes"


@dataclass(frozen=True)
class BudgetEnforcement:
    """How the RAM budget is held: the mode to record in the result, the limit in force, and why."""

    mode: Mode
    limit_bytes: int | None  # the effective limit the kernel enforces (None: accounting only)
    cgroup_path: str | None  # the cgroup folder whose limit applies
    reason: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _mounts() -> list[tuple[Path, str, str, str]]:
    """(mount point, root inside the hierarchy, fs type, super options) of every cgroup mount."""
    rows = []
    try:
        text = _MOUNTINFO.read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        if rfields[0] in ("cgroup", "cgroup2"):
            rows.append((Path(fields[4]), fields[3], rfields[0], rfields[2]))
    return rows


def detect_hierarchy() -> CgroupHierarchy | None:
    """This process's memory cgroup (v1 memory controller first, else v2 with memory enabled), or None."""
    try:
        lines = _PROC_CGROUP.read_text().splitlines()
    except OSError:
        return None
    v1_path = v2_path = None
    for line in lines:
        hier_id, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            v1_path = path
        elif hier_id == "0" and controllers == "":
            v2_path = path
    for mount, root, fstype, options in _mounts():
        if v1_path is not None and fstype == "cgroup" and "memory" in options.split(","):
            return CgroupHierarchy(1, mount, _inside(mount, root, v1_path))
    for mount, root, fstype, _ in _mounts():
        if v2_path is not None and fstype == "cgroup2":
            controllers = _read(mount / "cgroup.controllers") or ""
            if "memory" in controllers.split():
                return CgroupHierarchy(2, mount, _inside(mount, root, v2_path))
    return None


def _inside(mount: Path, root: str, path: str) -> Path:
    # In a cgroup namespace the mount's root can be a sub-folder of the hierarchy.
    rel = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
    return mount if rel in (".", "") else mount / rel


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _read_limit(folder: Path, version: int) -> int | None:
    """The limit set on one cgroup folder in bytes; None when it has none."""
    raw = _read(folder / ("memory.max" if version == 2 else "memory.limit_in_bytes"))
    if raw is None or raw == "max":
        return None
    value = int(raw)
    return None if value >= _V1_UNLIMITED else value


def effective_limit(hier: CgroupHierarchy) -> tuple[int | None, Path | None]:
    """The tightest limit on this cgroup and its ancestors up to the mount, and the folder that sets it."""
    best: tuple[int | None, Path | None] = (None, None)
    folder = hier.path
    while True:
        limit = _read_limit(folder, hier.version)
        if limit is not None and (best[0] is None or limit < best[0]):
            best = (limit, folder)
        if folder == hier.mount or hier.mount not in folder.parents:
            return best
        folder = folder.parent


def _write(path: Path, value: str) -> None:
    with open(path, "w") as handle:
        handle.write(value)


def _reap_stale_children(parent: Path) -> None:
    """Remove empty harness cgroups left by processes that have exited (their names carry the pid)."""
    try:
        children = [p for p in parent.iterdir() if p.is_dir() and p.name.startswith(CHILD_PREFIX)]
    except OSError:
        return
    for child in children:
        pid_part = child.name[len(CHILD_PREFIX) :].split("-", 1)[0]
        if pid_part.isdigit() and psutil.pid_exists(int(pid_part)):
            continue
        # Still holds a process (or raced with another reaper): leave it.
        with contextlib.suppress(OSError):
            child.rmdir()


def create_child(hier: CgroupHierarchy, limit_bytes: int, tag: str) -> Path:
    """Create `harness-<pid>-<tag>` under this process's cgroup with the memory limit; OSError if refused."""
    parent = hier.path
    _reap_stale_children(parent)
    if hier.version == 2:
        enabled = (_read(parent / "cgroup.subtree_control") or "").split()
        if "memory" not in enabled:
            # Fails with EBUSY when `parent` holds processes itself (no-internal-process rule).
            _write(parent / "cgroup.subtree_control", "+memory")
    child = parent / f"{CHILD_PREFIX}{os.getpid()}-{tag}"
    child.mkdir(exist_ok=True)
    try:
        if hier.version == 1:
            # Charge the pages a process already holds to the new group when it moves in (v1 only).
            _try_write(child / "memory.move_charge_at_immigrate", "3")
            _write(child / "memory.limit_in_bytes", str(limit_bytes))
            # Without swap accounting the process could swap instead of being held to the budget.
            _try_write(child / "memory.memsw.limit_in_bytes", str(limit_bytes))
        else:
            _write(child / "memory.max", str(limit_bytes))
            _try_write(child / "memory.swap.max", "0")
            # An OOM kill takes the whole cell, not one thread of it.
            _try_write(child / "memory.oom.group", "1")
    except OSError:
        remove_child(child)
        raise
    return child


def _try_write(path: Path, value: str) -> None:
    try:
        _write(path, value)
    except OSError as exc:
        log.debug("cannot write %s to %s: %s", value, path, exc)


def _member_pids(child: Path) -> list[int]:
    """The processes in `child` now (v1 and v2 both list them in `cgroup.procs`)."""
    return [int(pid) for pid in (_read(child / "cgroup.procs") or "").split()]


def remove_child(child: Path, timeout_s: float = _REMOVE_TIMEOUT_S) -> None:
    """Kill whatever still runs in `child`, wait until the kernel lets it go, and remove it.

    A cell's cgroup is removed once the cell is over, so anything left in it is a straggler: a
    grandchild that outlived the cell, or a child forked while a signal interrupted `Popen` (which then
    never returned it to be stopped). rmdir fails with EBUSY while a killed process is still exiting,
    so it is retried until `timeout_s`; a cgroup still busy after that is logged, not left silently.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        for pid in _member_pids(child):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        try:
            child.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                log.warning("cannot remove cgroup %s: %s", child, exc)
                return
        time.sleep(_REMOVE_POLL_S)


def enforce_budget(limit_bytes: int | None) -> BudgetEnforcement:
    """Hold the current process to `limit_bytes` (page cache included), or say why that is not possible.

    Already under an equal or tighter limit (within one page): nothing moves. Otherwise a fresh
    child cgroup with the limit is created under this process's own cgroup and the process moves in.
    """
    if limit_bytes is None or not enforceable(limit_bytes):
        return current_enforcement(limit_bytes)
    hier = detect_hierarchy()
    if hier is None:
        return BudgetEnforcement(
            "accounting-only", None, None, "no memory cgroup controller found (neither v1 nor v2 with memory)"
        )
    current, where = effective_limit(hier)
    if current is not None and current <= limit_bytes + _PAGE_BYTES:
        note = "" if current >= limit_bytes - _PAGE_BYTES else f" (tighter than the requested {limit_bytes} bytes)"
        return BudgetEnforcement(hier.mode, current, str(where), f"already under {hier.limit_file}={current}{note}")
    try:
        child = create_child(hier, limit_bytes, "run")
        _write(child / "cgroup.procs", str(os.getpid()))
    except OSError as exc:
        return BudgetEnforcement(
            "accounting-only",
            None,
            None,
            f"cannot create a memory cgroup under {hier.path} ({exc.strerror or exc}); "
            "reads must bypass the page cache",
        )
    moved = CgroupHierarchy(hier.version, hier.mount, child)
    limit, where = effective_limit(moved)
    log.info("moved pid %d into %s with %s=%s", os.getpid(), child, hier.limit_file, limit)
    return BudgetEnforcement(hier.mode, limit, str(where), f"moved into {child} with {hier.limit_file}={limit}")


def enforceable(limit_bytes: int) -> bool:
    """Whether a cgroup can hold this limit: at or above 2^62 bytes a limit reads back as "no limit"."""
    return limit_bytes < _V1_UNLIMITED


def current_enforcement(limit_bytes: int | None) -> BudgetEnforcement:
    """How this process is held to `limit_bytes` now, without moving it: a cgroup limit at least as tight
    (within one 4 KiB page) is enforcement; anything else is accounting only."""
    if limit_bytes is None:
        return BudgetEnforcement("accounting-only", None, None, "no RAM budget given")
    if not enforceable(limit_bytes):
        return BudgetEnforcement(
            "accounting-only", None, None, f"a budget of {limit_bytes} bytes (2^62 or more) cannot be a cgroup limit"
        )
    hier = detect_hierarchy()
    current, where = effective_limit(hier) if hier else (None, None)
    if hier is not None and current is not None and current <= limit_bytes + _PAGE_BYTES:
        return BudgetEnforcement(hier.mode, current, str(where), f"running under {hier.limit_file}={current}")
    return BudgetEnforcement("accounting-only", None, None, "not running inside a memory cgroup with the budget")


def budget_status(enforcement: BudgetEnforcement | str | Path | None) -> dict[str, int | None]:
    """Usage, peak, limit, failcnt and OOM kills of the budget's cgroup (all None where unknown)."""
    path = enforcement.cgroup_path if isinstance(enforcement, BudgetEnforcement) else enforcement
    if path is None:
        return {"usage_bytes": None, "peak_bytes": None, "limit_bytes": None, "failcnt": None, "oom_kills": None}
    return cgroup_counters(Path(path))


def _int_or_none(text: str | None) -> int | None:
    if text is None or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _keyed(text: str | None) -> dict[str, int]:
    out = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def cgroup_counters(folder: Path) -> dict[str, int | None]:
    """Memory counters of one cgroup folder, v1 or v2 (told apart by the files present)."""
    if (folder / "memory.limit_in_bytes").exists():
        limit = _int_or_none(_read(folder / "memory.limit_in_bytes"))
        oom = _keyed(_read(folder / "memory.oom_control"))
        return {
            "usage_bytes": _int_or_none(_read(folder / "memory.usage_in_bytes")),
            "peak_bytes": _int_or_none(_read(folder / "memory.max_usage_in_bytes")),
            "limit_bytes": None if limit is None or limit >= _V1_UNLIMITED else limit,
            # Counts every charge that hit the limit, reclaim included: routine under page-cache pressure.
            "failcnt": _int_or_none(_read(folder / "memory.failcnt")),
            "oom_kills": oom.get("oom_kill"),
        }
    events = _keyed(_read(folder / "memory.events"))
    return {
        "usage_bytes": _int_or_none(_read(folder / "memory.current")),
        "peak_bytes": _int_or_none(_read(folder / "memory.peak")),
        "limit_bytes": _int_or_none(_read(folder / "memory.max")),
        "failcnt": events.get("max"),
        "oom_kills": events.get("oom_kill"),
    }


def read_usage_bytes(folder: Path) -> int | None:
    """Current usage of a cgroup (page cache included), cheap enough for a 10 Hz sampler."""
    for name in ("memory.usage_in_bytes", "memory.current"):
        value = _int_or_none(_read(folder / name))
        if value is not None:
            return value
    return None


OOM_REASON = "killed by the memory limit (cgroup OOM)"


def kill_reason(rc: int, counters: dict[str, int | None]) -> str | None:
    """Why a child that exited with `rc` was stopped, or None when nothing killed it.

    The memory limit is named only when the cgroup's own counters show an OOM kill (v2 memory.events
    oom_kill, v1 memory.oom_control oom_kill); any other death is "killed by signal NAME"."""
    if counters.get("oom_kills"):
        return OOM_REASON
    if rc >= 0:
        return None
    name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
    if counters.get("oom_kills") is None and counters.get("limit_bytes") is not None and -rc == signal.SIGKILL:
        return f"killed by signal {name} (this kernel's cgroup does not count OOM kills, so the cause is unknown)"
    return f"killed by signal {name}"


class CellCgroup:
    """The memory cgroup of one sweep cell: created before the cell starts, inspected and removed after.

    `prefix` goes in front of the cell's command: a shell that writes its pid into the cgroup and then
    execs the command (so everything the cell allocates is charged), or `systemd-run --user --scope`
    where only the user's systemd may create cgroups. `prefix` is empty in accounting-only mode.
    """

    def __init__(self, limit_bytes: int | None, tag: str) -> None:
        self.limit_bytes = limit_bytes
        self.path: Path | None = None
        self.prefix: list[str] = []
        self.mode: Mode = "accounting-only"
        self.reason = "no RAM budget given"
        if limit_bytes is None:
            return
        if not enforceable(limit_bytes):
            self.reason = f"a budget of {limit_bytes} bytes (2^62 or more) cannot be a cgroup limit"
            return
        hier = detect_hierarchy()
        if hier is not None:
            try:
                self.path = create_child(hier, limit_bytes, tag)
            except OSError as exc:
                self.reason = f"cannot create a memory cgroup under {hier.path} ({exc.strerror or exc})"
            else:
                self.mode = hier.mode
                self.reason = f"cell cgroup {self.path} with {hier.limit_file}={limit_bytes}"
                self.prefix = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path)]
                return
        else:
            self.reason = "no memory cgroup controller found"
        if _user_systemd_scope_works():
            self.mode = "cgroup-v2"
            self.reason = f"transient systemd user scope with MemoryMax={limit_bytes}"
            self.prefix = [
                "systemd-run",
                "--user",
                "--scope",
                "--quiet",
                "--collect",
                "-p",
                f"MemoryMax={limit_bytes}",
                "-p",
                "MemorySwapMax=0",
                "--",
            ]

    def counters(self) -> dict[str, int | None]:
        return budget_status(self.path)

    def close(self) -> None:
        if self.path is not None:
            remove_child(self.path)

    def __enter__(self) -> CellCgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _user_systemd_scope_works() -> bool:
    """Whether `systemd-run --user --scope` can start a scope with a memory limit here (cgroup v2 only)."""
    if shutil.which("systemd-run") is None or not Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return False
    try:
        probe = subprocess.run(
            ["systemd-run", "--user", "--scope", "--quiet", "--collect", "-p", "MemoryMax=1G", "--", "true"],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def drop_page_cache(paths: Iterable[str | Path] = ()) -> str:
    """Empty the page cache so the next cell starts cold; returns the method used.

    "drop_caches": `sync` then `echo 1 > /proc/sys/vm/drop_caches` (needs root). Otherwise
    "fadvise": POSIX_FADV_DONTNEED on every file under `paths` (the expert file, the model);
    "none" when neither was possible.
    """
    os.sync()
    try:
        _write(_DROP_CACHES, "1")
        return "drop_caches"
    except OSError as exc:
        log.debug("cannot write %s (%s); falling back to fadvise", _DROP_CACHES, exc)
    dropped = 0
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
        for file in files:
            try:
                fd = os.open(file, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                dropped += 1
            finally:
                os.close(fd)
    return "fadvise" if dropped else "none"
