"""RAM budget enforcement: cgroup detection, limits that hold (page cache included), OOM detection, cache drops.

Tests that move a process into a cgroup do it in a child process, never in pytest itself.
"""

from __future__ import annotations

import errno
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import budget

MiB = 2**20


def _cgroup_writable() -> str | None:
    """None when this machine lets us create memory cgroups, else the reason it does not."""
    hier = budget.detect_hierarchy()
    if hier is None:
        return "no memory cgroup controller on this machine"
    try:
        child = budget.create_child(hier, 64 * MiB, "probe")
    except OSError as exc:
        return f"cannot create memory cgroups under {hier.path}: {exc}"
    budget.remove_child(child)
    return None


NO_CGROUP = _cgroup_writable()
needs_cgroup = pytest.mark.skipif(NO_CGROUP is not None, reason=str(NO_CGROUP))

_ENFORCE = """
import json, sys
from harness import budget
first = budget.enforce_budget(int(sys.argv[1]))
second = budget.enforce_budget(int(sys.argv[2]))
print(json.dumps({"first": first.to_dict(), "second": second.to_dict(), "status": budget.budget_status(first)}))
"""


def _enforce_in_child(first: int, second: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _ENFORCE, str(first), str(second)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@needs_cgroup
def test_enforce_budget_moves_the_process_then_keeps_a_tighter_limit():
    got = _enforce_in_child(96 * MiB, 200 * MiB)
    first, second = got["first"], got["second"]
    assert first["mode"] == budget.detect_hierarchy().mode
    assert first["limit_bytes"] == 96 * MiB
    assert Path(first["cgroup_path"]).name.startswith(budget.CHILD_PREFIX)
    # A looser request leaves the process where it is, under the tighter limit, and says so.
    assert second["cgroup_path"] == first["cgroup_path"]
    assert second["limit_bytes"] == 96 * MiB
    assert "tighter" in second["reason"]
    assert got["status"]["limit_bytes"] == 96 * MiB
    assert got["status"]["oom_kills"] == 0


def test_no_budget_is_accounting_only():
    enforcement = budget.enforce_budget(None)
    assert enforcement.mode == "accounting-only"
    assert enforcement.cgroup_path is None
    assert budget.budget_status(enforcement)["usage_bytes"] is None


def test_no_cgroup_controller_is_accounting_only_with_a_reason(monkeypatch, tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/user.slice\n")
    monkeypatch.setattr(budget, "_PROC_CGROUP", proc)
    monkeypatch.setattr(budget, "_MOUNTINFO", tmp_path / "absent")
    enforcement = budget.enforce_budget(64 * MiB)
    assert enforcement.mode == "accounting-only"
    assert "no memory cgroup" in enforcement.reason


def test_detects_cgroup_v2_from_proc_files(monkeypatch, tmp_path):
    mount = tmp_path / "unified"
    (mount / "user.slice" / "app").mkdir(parents=True)
    (mount / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (mount / "user.slice" / "memory.max").write_text("1073741824\n")
    (mount / "user.slice" / "app" / "memory.max").write_text("max\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/user.slice/app\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"30 23 0:26 / {mount} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n")
    monkeypatch.setattr(budget, "_PROC_CGROUP", proc)
    monkeypatch.setattr(budget, "_MOUNTINFO", mountinfo)
    hier = budget.detect_hierarchy()
    assert hier == budget.CgroupHierarchy(2, mount, mount / "user.slice" / "app")
    # The parent's limit binds the child that has none of its own.
    assert budget.effective_limit(hier) == (1073741824, mount / "user.slice")


def test_counters_of_v1_and_v2_folders(tmp_path):
    v1 = tmp_path / "v1"
    v1.mkdir()
    for name, value in {
        "memory.limit_in_bytes": "104857600",
        "memory.usage_in_bytes": "5000",
        "memory.max_usage_in_bytes": "104857600",
        "memory.failcnt": "17",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
    }.items():
        (v1 / name).write_text(value + "\n")
    assert budget.cgroup_counters(v1) == {
        "usage_bytes": 5000,
        "peak_bytes": 104857600,
        "limit_bytes": 104857600,
        "failcnt": 17,
        "oom_kills": 1,
    }
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("max\n")
    (v2 / "memory.current").write_text("123\n")
    (v2 / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 2\n")
    got = budget.cgroup_counters(v2)
    assert (got["limit_bytes"], got["usage_bytes"], got["failcnt"], got["oom_kills"]) == (None, 123, 4, 2)


@needs_cgroup
def test_cell_cgroup_kills_a_cell_over_budget_and_says_so():
    with budget.CellCgroup(64 * MiB, "test-oom") as cell:
        assert cell.mode in ("cgroup-v1", "cgroup-v2")
        hog = "b = bytearray(256 * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
        proc = subprocess.run([*cell.prefix, sys.executable, "-c", hog], capture_output=True)
        counters = cell.counters()
    assert proc.returncode in (-9, 137)
    assert counters["oom_kills"] >= 1


@needs_cgroup
def test_page_cache_is_charged_and_reclaimed_under_the_limit(tmp_path):
    data = tmp_path / "blob"
    data.write_bytes(b"\1" * (96 * MiB))
    reader = f"f = open({str(data)!r}, 'rb')\nwhile f.read(2**20): pass\n"
    with budget.CellCgroup(48 * MiB, "test-cache") as cell:
        proc = subprocess.run([*cell.prefix, sys.executable, "-c", reader], capture_output=True)
        counters = cell.counters()
    # Reading twice the limit through the page cache succeeds: clean cache pages are reclaimed, not fatal.
    assert proc.returncode == 0, proc.stderr
    assert counters["oom_kills"] == 0
    assert counters["peak_bytes"] <= 48 * MiB


@needs_cgroup
def test_closing_a_cell_cgroup_kills_what_still_runs_in_it_and_removes_it():
    # A process left in the cgroup, as a child forked while a signal interrupted Popen is.
    cell = budget.CellCgroup(64 * MiB, "test-straggler")
    proc = subprocess.Popen([*cell.prefix, sys.executable, "-c", "import time; time.sleep(60)"])
    path = cell.path
    deadline = time.monotonic() + 10
    while str(proc.pid) not in (path / "cgroup.procs").read_text().split():
        assert time.monotonic() < deadline, "the process never entered its cgroup"
        time.sleep(0.01)
    cell.close()
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert not path.exists()


def _busy_rmdir(monkeypatch, fails: int) -> list[Path]:
    """Make rmdir fail with EBUSY `fails` times (as it does while a killed process is exiting), then succeed."""
    calls: list[Path] = []

    def rmdir(self: Path) -> None:
        calls.append(self)
        if len(calls) <= fails:
            raise OSError(errno.EBUSY, "Device or resource busy", str(self))

    monkeypatch.setattr(budget, "_member_pids", lambda child: [])
    monkeypatch.setattr(Path, "rmdir", rmdir)
    return calls


def test_removing_a_cgroup_retries_while_it_is_busy(monkeypatch, tmp_path):
    calls = _busy_rmdir(monkeypatch, fails=3)
    budget.remove_child(tmp_path / "cell")
    assert calls == [tmp_path / "cell"] * 4


def test_a_cgroup_busy_past_the_timeout_is_logged(monkeypatch, tmp_path, caplog):
    calls = _busy_rmdir(monkeypatch, fails=10**9)
    with caplog.at_level(logging.WARNING, logger=budget.__name__):
        budget.remove_child(tmp_path / "cell", timeout_s=0.05)
    assert len(calls) >= 2
    assert f"cannot remove cgroup {tmp_path / 'cell'}" in caplog.text


def test_drop_page_cache_falls_back_to_fadvise(monkeypatch, tmp_path):
    monkeypatch.setattr(budget, "_DROP_CACHES", tmp_path / "no" / "such" / "file")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "experts.bin").write_bytes(b"x" * 8192)
    assert budget.drop_page_cache([tmp_path / "model"]) == "fadvise"
    assert budget.drop_page_cache([tmp_path / "absent"]) == "none"


def test_stale_child_cgroups_of_dead_processes_are_removed(tmp_path):
    dead = tmp_path / f"{budget.CHILD_PREFIX}999999999-run"
    alive = tmp_path / f"{budget.CHILD_PREFIX}1-run"  # pid 1 always exists
    other = tmp_path / "someone-else"
    for folder in (dead, alive, other):
        folder.mkdir()
    budget._reap_stale_children(tmp_path)
    assert not dead.exists()
    assert alive.exists() and other.exists()
