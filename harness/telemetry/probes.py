"""What the telemetry sampler reads: the expert file's block device, the host, the budget cgroup, the GPU.

Each probe has fixed `columns` and a `read()` returning one value per column (SI units, names
ending in `_bytes`, `_s`, `_pct`, `_w`, `_c`, `_hz`). A probe that cannot work here is not built;
the reason is reported instead, so a missing GPU never crashes a run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from harness.budget import read_usage_bytes

# /sys/block/<dev>/stat counts sectors of 512 bytes whatever the device's sector size
# (Documentation/block/stat.rst); psutil reports the same counters.
_STAT_SECTOR_BYTES = 512
# NVML reports PCIe throughput in KB/s, with KB = 1024 bytes (nvml.h, nvmlDeviceGetPcieThroughput).
_NVML_KB = 1024
_MHZ = 1e6
_MW_PER_W = 1000.0


class DiskProbe:
    """Cumulative read/write bytes, operations and busy time of one whole disk since the probe was built."""

    columns = ("disk_read_bytes", "disk_write_bytes", "disk_read_ops", "disk_write_ops", "disk_busy_s")

    def __init__(self, device: str) -> None:
        self.device = device
        self._stat = Path("/sys/block") / device / "stat"
        self._base = self._raw()

    def _raw(self) -> tuple[int, int, int, int, int]:
        f = self._stat.read_text().split()
        # reads completed, sectors read, writes completed, sectors written, io_ticks (ms busy)
        return int(f[0]), int(f[2]), int(f[4]), int(f[6]), int(f[9])

    def read(self) -> tuple[float, ...]:
        r_ops, r_sec, w_ops, w_sec, busy_ms = (now - base for now, base in zip(self._raw(), self._base, strict=True))
        return (
            float(r_sec * _STAT_SECTOR_BYTES),
            float(w_sec * _STAT_SECTOR_BYTES),
            float(r_ops),
            float(w_ops),
            busy_ms / 1000.0,
        )


class HostProbe:
    """System CPU utilisation, the run's CPU and RSS, available memory and page-cache size.

    Read straight from /proc (the files psutil parses) at a third of psutil's cost per sample,
    which keeps a 10 Hz sampler well under 1% of a core.
    """

    columns = ("cpu_pct", "process_cpu_pct", "rss_bytes", "mem_available_bytes", "page_cache_bytes")

    def __init__(self) -> None:
        self._page_bytes = os.sysconf("SC_PAGE_SIZE")
        self._last_cpu = self._system_cpu()
        self._last_proc = self._process_cpu_s()
        self._last_t = time.perf_counter()

    @staticmethod
    def _system_cpu() -> tuple[int, int]:
        """(all ticks, idle ticks) since boot, summed over cores; idle includes iowait."""
        with open("/proc/stat", "rb") as handle:
            ticks = [int(x) for x in handle.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]

    @staticmethod
    def _process_cpu_s() -> float:
        t = os.times()
        return t.user + t.system

    def _meminfo(self) -> tuple[float, float]:
        with open("/proc/meminfo", "rb") as handle:
            text = handle.read()
        available = cached = float("nan")
        for line in text.split(b"\n"):
            if line.startswith(b"MemAvailable:"):
                available = int(line.split()[1]) * 1024.0  # /proc/meminfo counts KiB
            elif line.startswith(b"Cached:"):
                cached = int(line.split()[1]) * 1024.0
        return available, cached

    def read(self) -> tuple[float, ...]:
        now = time.perf_counter()
        total, idle = self._system_cpu()
        proc_s = self._process_cpu_s()
        d_total = total - self._last_cpu[0]
        cpu_pct = 100.0 * (d_total - (idle - self._last_cpu[1])) / d_total if d_total > 0 else 0.0
        wall = now - self._last_t
        proc_pct = 100.0 * (proc_s - self._last_proc) / wall if wall > 0 else 0.0
        self._last_cpu, self._last_proc, self._last_t = (total, idle), proc_s, now
        with open("/proc/self/statm", "rb") as handle:
            rss = int(handle.read().split()[1]) * self._page_bytes
        available, cached = self._meminfo()
        # cpu_pct: all cores, 100 = every core busy; process_cpu_pct: 100 = one core busy.
        return cpu_pct, proc_pct, float(rss), available, cached


def process_io_bytes() -> tuple[int, int]:
    """(read, write) bytes this process (all its threads) made the storage layer fetch or store.

    From /proc/self/io `read_bytes`/`write_bytes`: O_DIRECT reads, page-cache misses and readahead
    count; page-cache hits do not. Unlike the whole-disk counters, other processes' I/O on the same
    disk does not leak in, so this is the device-side figure to compare with the harness's own count.
    """
    read = write = 0
    with open("/proc/self/io", "rb") as handle:
        for line in handle:
            if line.startswith(b"read_bytes:"):
                read = int(line.split()[1])
            elif line.startswith(b"write_bytes:"):
                write = int(line.split()[1])
    return read, write


class ProcessIoProbe:
    """Storage bytes read and written by this process since the probe was built (see process_io_bytes)."""

    columns = ("process_read_bytes", "process_write_bytes")

    def __init__(self) -> None:
        self._base = process_io_bytes()

    def read(self) -> tuple[float, ...]:
        read, write = process_io_bytes()
        return float(read - self._base[0]), float(write - self._base[1])


class CgroupProbe:
    """Usage of the budget's memory cgroup, page cache included (what the limit is compared with)."""

    columns = ("cgroup_usage_bytes",)

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if read_usage_bytes(self.folder) is None:
            raise OSError(f"no memory usage file in {self.folder}")

    def read(self) -> tuple[float, ...]:
        value = read_usage_bytes(self.folder)
        return (float("nan") if value is None else float(value),)


class GpuProbe:
    """One GPU through NVML: utilisation, memory, power, PCIe rx/tx, temperature, SM clock.

    Fields the GPU does not support are left out (listed in `unsupported`).
    """

    def __init__(self, index: int) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        try:
            self.index = index
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.name = str(pynvml.nvmlDeviceGetName(handle))
        except Exception:
            pynvml.nvmlShutdown()
            raise
        getters: dict[str, Callable[[], float]] = {
            "gpu_util_pct": lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            "gpu_mem_used_bytes": lambda: float(pynvml.nvmlDeviceGetMemoryInfo(handle).used),
            "gpu_power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / _MW_PER_W,
            "gpu_pcie_rx_bytes_per_s": lambda: float(
                pynvml.nvmlDeviceGetPcieThroughput(handle, pynvml.NVML_PCIE_UTIL_RX_BYTES) * _NVML_KB
            ),
            "gpu_pcie_tx_bytes_per_s": lambda: float(
                pynvml.nvmlDeviceGetPcieThroughput(handle, pynvml.NVML_PCIE_UTIL_TX_BYTES) * _NVML_KB
            ),
            "gpu_temp_c": lambda: float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)),
            "gpu_sm_clock_hz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM) * _MHZ,
        }
        self.unsupported: dict[str, str] = {}
        self._getters: list[Callable[[], float]] = []
        columns = []
        for column, getter in getters.items():
            try:
                getter()
            except pynvml.NVMLError as exc:
                self.unsupported[column] = str(exc)
                continue
            columns.append(column)
            self._getters.append(getter)
        self.columns = tuple(columns)

    def read(self) -> tuple[float, ...]:
        values = []
        for getter in self._getters:
            try:
                values.append(getter())
            except self._nvml.NVMLError:
                values.append(float("nan"))  # a transient driver error loses one sample, not the run
        return tuple(values)

    def close(self) -> None:
        self._nvml.nvmlShutdown()


def open_gpu(index: int) -> tuple[GpuProbe | None, str | None]:
    """A GPU probe, or None and the reason (no NVML library, no driver, no such GPU)."""
    try:
        probe = GpuProbe(index)
    except Exception as exc:  # pynvml raises NVMLError subclasses, ImportError or OSError by machine
        return None, f"no GPU telemetry: {exc.__class__.__name__}: {exc}"
    if not probe.columns:
        probe.close()
        return None, f"no GPU telemetry: GPU {index} supports none of the fields ({probe.unsupported})"
    return probe, None
