"""Device listing and path -> device resolution, checked against this machine's sysfs and /proc/diskstats."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from harness.errors import HarnessError
from harness.ssd.devices import (
    block_device_for_path,
    describe_path,
    list_devices,
    mount_for_path,
    probe_o_direct,
    read_mounts,
)

REQUIRED_KEYS = {
    "path",
    "mountpoint",
    "filesystem",
    "device",
    "disk",
    "model",
    "serial",
    "transport",
    "rotational",
    "logical_block_bytes",
    "physical_block_bytes",
    "scheduler",
    "o_direct_supported",
    "source",
}


def test_describe_path_has_the_stable_keys(tmp_path: Path) -> None:
    info = describe_path(tmp_path)
    assert set(info) >= REQUIRED_KEYS
    assert info["path"] == os.path.realpath(tmp_path)
    assert info["source"] in ("udev", "sysfs")
    assert isinstance(info["o_direct_supported"], bool)


def test_describe_path_agrees_with_sysfs(tmp_path: Path) -> None:
    info = describe_path(tmp_path)
    if info["disk"] is None:
        pytest.skip(f"{tmp_path} is on {info['filesystem']}, which has no block device")
    disk = Path("/sys/block") / info["disk"]
    assert disk.exists()
    assert info["logical_block_bytes"] == int((disk / "queue" / "logical_block_size").read_text())
    assert info["physical_block_bytes"] == int((disk / "queue" / "physical_block_size").read_text())
    assert info["rotational"] == bool(int((disk / "queue" / "rotational").read_text()))
    assert info["size_bytes"] == int((disk / "size").read_text()) * 512
    st_dev = os.stat(tmp_path).st_dev
    node = Path(f"/sys/dev/block/{os.major(st_dev)}:{os.minor(st_dev)}")
    if node.exists():
        assert info["device"] == node.resolve().name


def test_block_device_is_a_diskstats_key(tmp_path: Path) -> None:
    name = block_device_for_path(tmp_path)
    if name is None:
        pytest.skip(f"{tmp_path} has no block device")
    assert name in psutil.disk_io_counters(perdisk=True)
    assert name == describe_path(tmp_path)["disk"]


def test_no_block_device_for_proc_or_missing_path(tmp_path: Path) -> None:
    assert block_device_for_path("/proc") is None
    assert block_device_for_path(tmp_path / "missing") is None


def test_describe_missing_path_is_a_harness_error(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="does not exist"):
        describe_path(tmp_path / "missing")


def test_list_devices_matches_sys_block() -> None:
    expected = {p.name for p in Path("/sys/block").iterdir() if int((p / "size").read_text()) > 0}
    devices = list_devices()
    assert {d["name"] for d in devices} == expected
    for device in devices:
        for part in device["partitions"]:
            assert (Path("/sys/block") / device["name"] / part["name"] / "partition").exists()
    root_dev = os.stat("/").st_dev
    root = f"{os.major(root_dev)}:{os.minor(root_dev)}"
    holders = [d for d in devices if d["devnum"] == root] + [
        p for d in devices for p in d["partitions"] if p["devnum"] == root
    ]
    if holders:
        assert any(m["mountpoint"] == "/" for m in holders[0]["mounts"])


def test_mount_for_path_takes_the_longest_prefix(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "40 27 259:1 / /mnt/nvme rw,relatime - xfs /dev/nvme0n1p1 rw\n"
        "41 27 0:50 / /mnt/nvme2 rw,relatime - tmpfs tmp\\040fs rw\n"
    )
    mounts = read_mounts(mountinfo)
    assert mounts[2].source == "tmp fs"
    assert mount_for_path("/mnt/nvme/x", mounts).fstype == "xfs"
    assert mount_for_path("/mnt/nvme2/x", mounts).fstype == "tmpfs"
    assert mount_for_path("/mnt/nvmeother", mounts).fstype == "ext4"


def test_o_direct_probe_leaves_nothing_behind(tmp_path: Path) -> None:
    ok, note = probe_o_direct(tmp_path)
    assert isinstance(ok, bool) and note
    assert list(tmp_path.iterdir()) == []
