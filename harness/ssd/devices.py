"""Block devices and the device that holds a path: pyudev where udev has data, sysfs otherwise.

In containers and VMs there is often no udevd, so the udev database has no ID_* properties;
every field then comes from /sys and the result says `"source": "sysfs"`. The kernel's
`rotational` flag is only a default for many drivers (virtio reports 1 for an NVMe-backed
volume), so `media` is a guess that names its evidence rather than a copy of that flag.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

log = logging.getLogger(__name__)

SYS_BLOCK = Path("/sys/block")
SYS_DEV_BLOCK = Path("/sys/dev/block")
MOUNTINFO = Path("/proc/self/mountinfo")
# The sysfs `size` attribute counts 512-byte sectors whatever the device's logical block size.
SYSFS_SECTOR_BYTES = 512
VOLATILE_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs"})
"""Filesystems in memory: a read from them is not an SSD read (a run there is INVALID, a profile refused)."""
# O_DIRECT alignment used by the probe: one page covers every logical block size in use (512 B, 4 KiB).
_PROBE_BYTES = 4096


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo."""

    mountpoint: str
    fstype: str
    source: str
    major: int
    minor: int
    super_options: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
    return field.encode().decode("unicode_escape") if "\\" in field else field


def read_mounts(mountinfo: Path = MOUNTINFO) -> list[Mount]:
    """All mounts, in mount order (a later mount on the same point hides an earlier one)."""
    mounts = []
    for line in mountinfo.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 2:
            continue
        major, _, minor = fields[2].partition(":")
        mounts.append(
            Mount(
                mountpoint=_unescape(fields[4]),
                fstype=rfields[0],
                source=_unescape(rfields[1]),
                major=int(major),
                minor=int(minor),
                super_options=rfields[2] if len(rfields) > 2 else "",
            )
        )
    return mounts


def mount_for_path(path: str | Path, mounts: list[Mount] | None = None) -> Mount | None:
    """The mount that holds `path`: the longest mount point that prefixes its real path, latest wins."""
    real = os.path.realpath(path)
    best: Mount | None = None
    for mount in mounts if mounts is not None else read_mounts():
        point = mount.mountpoint
        inside = real == point or real.startswith(point.rstrip("/") + "/") or point == "/"
        if inside and (best is None or len(point) >= len(best.mountpoint)):
            best = mount
    return best


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _sysfs_node(major: int, minor: int) -> Path | None:
    node = SYS_DEV_BLOCK / f"{major}:{minor}"
    return node.resolve() if node.exists() else None


def _devnum_for_path(path: str, mount: Mount | None) -> tuple[int, int] | None:
    """Block device number behind `path`, through st_dev or, for anonymous st_dev (btrfs, overlay), the mount."""
    st_dev = os.stat(path).st_dev
    if _sysfs_node(os.major(st_dev), os.minor(st_dev)) is not None:
        return os.major(st_dev), os.minor(st_dev)
    if mount is None:
        return None
    if mount.source.startswith("/dev/"):
        with contextlib.suppress(OSError):
            rdev = os.stat(mount.source).st_rdev
            if _sysfs_node(os.major(rdev), os.minor(rdev)) is not None:
                return os.major(rdev), os.minor(rdev)
    if mount.fstype == "overlay":
        # A container's root: the writable layer lives on a real filesystem named in the options.
        for option in mount.super_options.split(","):
            if option.startswith("upperdir=") and os.path.exists(option[len("upperdir=") :]):
                upper = option[len("upperdir=") :]
                return _devnum_for_path(upper, mount_for_path(upper))
    return None


def _whole_disk(node: Path) -> Path:
    """The whole-disk sysfs node of a partition node; a disk (or dm/md device) is its own."""
    return node.parent if (node / "partition").exists() else node


def _scheduler(disk: Path) -> str | None:
    text = _read(disk / "queue" / "scheduler")
    if text is None:
        return None
    for word in text.split():
        if word.startswith("["):
            return word.strip("[]")
    return text or None


def _transport(name: str, node: Path, udev: dict[str, str]) -> str:
    bus = udev.get("ID_BUS")
    if udev.get("ID_PATH", "").find("-usb-") >= 0 or bus == "usb":
        return "usb"
    if bus:
        return "sata" if bus == "ata" else bus
    resolved = str(node)
    for prefix, transport in (("nvme", "nvme"), ("vd", "virtio"), ("xvd", "xen"), ("mmcblk", "mmc")):
        if name.startswith(prefix):
            return transport
    for prefix in ("loop", "zram", "ram", "dm-", "md", "nbd"):
        if name.startswith(prefix):
            return prefix.rstrip("-")
    for marker, transport in (("/usb", "usb"), ("/virtio", "virtio"), ("/ata", "sata"), ("/nvme", "nvme")):
        if marker in resolved:
            return transport
    if "/host" in resolved and "/target" in resolved:
        return "scsi"
    return "unknown"


def _media(transport: str, rotational: bool | None, udev: dict[str, str]) -> tuple[str, str]:
    """('ssd'|'hdd'|'unknown', evidence). The rotational flag alone decides nothing."""
    rpm = udev.get("ID_ATA_ROTATION_RATE_RPM")
    if rpm is not None:
        return ("ssd", "ATA rotation rate 0 (non-rotating)") if rpm == "0" else ("hdd", f"ATA rotation rate {rpm} rpm")
    if transport == "nvme":
        return "ssd", "NVMe transport"
    if transport in ("virtio", "xen", "loop", "zram", "ram", "nbd", "dm", "md"):
        return "unknown", f"{transport} device: the backing medium is not visible from here (rotational={rotational})"
    if rotational is False:
        return "ssd", "kernel reports non-rotational"
    if rotational is True:
        return "unknown", "kernel reports rotational; without an ATA rotation rate this may be a default"
    return "unknown", "no evidence"


def _udev_properties(major: int, minor: int) -> dict[str, str]:
    """udev's properties for the device, or {} without udev (pyudev missing, no database, no device)."""
    try:
        import pyudev

        device = pyudev.Devices.from_device_number(pyudev.Context(), "block", os.makedev(major, minor))
        return {key: device.properties[key] for key in device.properties}
    except Exception as exc:  # no udev in a container is normal, not an error
        log.debug("udev has no data for %d:%d: %s", major, minor, exc)
        return {}


def _has_udev_identity(props: dict[str, str]) -> bool:
    # The kernel's own uevent keys (DEVNAME, MAJOR, ...) appear even without udevd; ID_* come from udev rules.
    return any(key.startswith("ID_") for key in props)


def _identity(disk_name: str, disk: Path, udev: dict[str, str]) -> dict[str, Any]:
    model = udev.get("ID_MODEL") or _read(disk / "device" / "model")
    serial = udev.get("ID_SERIAL_SHORT") or udev.get("ID_SERIAL")
    serial = serial or _read(disk / "serial") or _read(disk / "device" / "serial")
    vendor = udev.get("ID_VENDOR") or _read(disk / "device" / "vendor")
    rotational_int = _read_int(disk / "queue" / "rotational")
    rotational = bool(rotational_int) if rotational_int is not None else None
    transport = _transport(disk_name, disk, udev)
    media, media_evidence = _media(transport, rotational, udev)
    sectors = _read_int(disk / "size")
    read_ahead_kib = _read_int(disk / "queue" / "read_ahead_kb")
    return {
        "model": model.replace("_", " ").strip() if model else None,
        "vendor": vendor,
        "serial": serial,
        "transport": transport,
        "rotational": rotational,
        "media": media,
        "media_evidence": media_evidence,
        "size_bytes": sectors * SYSFS_SECTOR_BYTES if sectors is not None else None,
        "logical_block_bytes": _read_int(disk / "queue" / "logical_block_size"),
        "physical_block_bytes": _read_int(disk / "queue" / "physical_block_size"),
        "scheduler": _scheduler(disk),
        "read_ahead_bytes": read_ahead_kib * 1024 if read_ahead_kib is not None else None,
        "source": "udev" if _has_udev_identity(udev) else "sysfs",
    }


def probe_o_direct(folder: str | Path) -> tuple[bool, str]:
    """Whether files in `folder` accept O_DIRECT: create a temp file there, open it O_DIRECT, read one page."""
    import mmap

    try:
        fd_tmp, tmp = tempfile.mkstemp(prefix=".harness-odirect-", dir=folder)
    except OSError as exc:
        return False, f"cannot create a probe file in {folder}: {exc.strerror}"
    try:
        os.write(fd_tmp, b"\0" * _PROBE_BYTES)
        os.close(fd_tmp)
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECT)
        except OSError as exc:
            return False, f"open(O_DIRECT) refused: {exc.strerror}"
        try:
            buf = mmap.mmap(-1, _PROBE_BYTES)
            try:
                os.preadv(fd, [buf], 0)
            except OSError as exc:
                return False, f"O_DIRECT read failed: {exc.strerror}"
            finally:
                buf.close()
        finally:
            os.close(fd)
        return True, "probe file opened and read with O_DIRECT"
    finally:
        Path(tmp).unlink(missing_ok=True)


def describe_path(path: str | Path) -> dict[str, Any]:
    """The filesystem and block device that hold `path`, with the device's identity and queue settings.

    Never raises for an existing path; fields it cannot learn are None. Keys: path, mountpoint,
    filesystem, mount_source, device (kernel name, a partition where there is one), disk (whole-disk
    name), model, vendor, serial, transport, rotational, media, media_evidence, size_bytes,
    logical_block_bytes, physical_block_bytes, scheduler, read_ahead_bytes, free_bytes,
    o_direct_supported, o_direct_note, source ('udev' or 'sysfs').
    """
    path = str(path)
    if not os.path.exists(path):
        raise HarnessError(f"path {path} does not exist: give an existing file or folder")
    mount = mount_for_path(path)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    o_direct, o_direct_note = probe_o_direct(folder)
    try:
        free_bytes: int | None = free_bytes_in(folder)
    except OSError:
        free_bytes = None
    result: dict[str, Any] = {
        "path": os.path.realpath(path),
        "mountpoint": mount.mountpoint if mount else None,
        "filesystem": mount.fstype if mount else None,
        "mount_source": mount.source if mount else None,
        "device": None,
        "disk": None,
        "free_bytes": free_bytes,
        "o_direct_supported": o_direct,
        "o_direct_note": o_direct_note,
    }
    devnum = _devnum_for_path(path, mount)
    if devnum is None:
        result.update(_identity_unknown())
        return result
    node = _sysfs_node(*devnum)
    assert node is not None  # _devnum_for_path only returns numbers that sysfs knows
    disk = _whole_disk(node)
    result["device"] = node.name
    result["disk"] = disk.name
    disk_num = _read(disk / "dev")
    major, _, minor = (disk_num or f"{devnum[0]}:{devnum[1]}").partition(":")
    udev = _udev_properties(int(major), int(minor))
    result.update(_identity(disk.name, disk, udev))
    return result


def free_bytes_in(folder: str | Path) -> int:
    """Bytes an unprivileged writer may still use in `folder`'s filesystem (statvfs f_bavail)."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def _identity_unknown() -> dict[str, Any]:
    keys = (
        "model",
        "vendor",
        "serial",
        "transport",
        "rotational",
        "size_bytes",
        "logical_block_bytes",
        "physical_block_bytes",
        "scheduler",
        "read_ahead_bytes",
    )
    out: dict[str, Any] = dict.fromkeys(keys)
    out.update(media="unknown", media_evidence="no block device behind this path (tmpfs, network or overlay)")
    out["source"] = "sysfs"
    return out


def block_device_for_path(path: str | Path) -> str | None:
    """Whole-disk kernel name (e.g. 'vda', 'nvme0n1', 'dm-0') whose /proc/diskstats counters cover `path`.

    That is the key of psutil.disk_io_counters(perdisk=True) to sample for I/O to the file; None
    for a path on no block device (tmpfs, NFS) or a missing path.
    """
    if not os.path.exists(path):
        return None
    mount = mount_for_path(path)
    devnum = _devnum_for_path(str(path), mount)
    if devnum is None:
        return None
    node = _sysfs_node(*devnum)
    return _whole_disk(node).name if node is not None else None


def list_devices(include_empty: bool = False) -> list[dict[str, Any]]:
    """Every whole block device in /sys/block with identity, partitions, mount points and filesystems.

    Devices of size 0 (unused loop and zram devices) are left out unless `include_empty`.
    """
    mounts = read_mounts()
    by_devnum: dict[str, list[Mount]] = {}
    for mount in mounts:
        by_devnum.setdefault(f"{mount.major}:{mount.minor}", []).append(mount)
    devices = []
    for disk in sorted(SYS_BLOCK.iterdir()):
        disk = disk.resolve()
        sectors = _read_int(disk / "size") or 0
        if sectors == 0 and not include_empty:
            continue
        devnum = _read(disk / "dev") or "0:0"
        major, _, minor = devnum.partition(":")
        udev = _udev_properties(int(major), int(minor))
        entry: dict[str, Any] = {"name": disk.name, "devnum": devnum}
        entry.update(_identity(disk.name, disk, udev))
        entry["mounts"] = _mount_entries(by_devnum.get(devnum, []), udev)
        entry["partitions"] = []
        for part in sorted(p for p in disk.iterdir() if (p / "partition").exists()):
            part_num = _read(part / "dev") or "0:0"
            pmajor, _, pminor = part_num.partition(":")
            pudev = _udev_properties(int(pmajor), int(pminor))
            psectors = _read_int(part / "size")
            entry["partitions"].append(
                {
                    "name": part.name,
                    "devnum": part_num,
                    "size_bytes": psectors * SYSFS_SECTOR_BYTES if psectors is not None else None,
                    "filesystem_label": pudev.get("ID_FS_LABEL"),
                    "mounts": _mount_entries(by_devnum.get(part_num, []), pudev),
                }
            )
        devices.append(entry)
    return devices


def _mount_entries(mounts: list[Mount], udev: dict[str, str]) -> list[dict[str, str]]:
    if not mounts and udev.get("ID_FS_TYPE"):
        return [{"mountpoint": "", "filesystem": udev["ID_FS_TYPE"]}]
    return [{"mountpoint": m.mountpoint, "filesystem": m.fstype} for m in mounts]


def describe_block_device(devnode: str | Path) -> dict[str, Any]:
    """Identity of a block device node such as /dev/nvme0n1 (for `profile-ssd --device`), same keys as describe_path."""
    rdev = os.stat(devnode).st_rdev
    node = _sysfs_node(os.major(rdev), os.minor(rdev))
    if node is None:
        raise HarnessError(f"{devnode} is not a block device known to sysfs")
    disk = _whole_disk(node)
    major, _, minor = (_read(disk / "dev") or "0:0").partition(":")
    mounts = [m for m in read_mounts() if (m.major, m.minor) == (os.major(rdev), os.minor(rdev))]
    result: dict[str, Any] = {
        "path": str(devnode),
        "mountpoint": mounts[0].mountpoint if mounts else None,
        "filesystem": mounts[0].fstype if mounts else None,
        "mount_source": mounts[0].source if mounts else None,
        "device": node.name,
        "disk": disk.name,
        "free_bytes": None,
        "o_direct_supported": True,
        "o_direct_note": "block devices accept O_DIRECT reads",
    }
    result.update(_identity(disk.name, disk, _udev_properties(int(major), int(minor))))
    return result
