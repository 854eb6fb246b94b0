"""Telemetry: sampler thread, device counters, events on the same clock, Parquet files, missing GPU."""

from __future__ import annotations

import os
import threading
import time

import pyarrow.parquet as pq
import pytest

from harness.ssd.devices import block_device_for_path
from harness.telemetry import EVENTS_FILE, TIMELINE_FILE, Telemetry, read_timeline
from harness.telemetry import recorder as recorder_module

HOST_COLUMNS = {"cpu_pct", "process_cpu_pct", "rss_bytes", "mem_available_bytes", "page_cache_bytes"}
GPU_PREFIX = "gpu_"


def test_timeline_and_events_share_one_clock(tmp_path):
    tel = Telemetry(50, gpu_index=None).start()
    tel.event("prefill_start", seq_id=0)

    def loads() -> None:
        for expert in range(20):
            tel.event("expert_load", layer=1, expert=expert, bytes=4096, duration_s=1e-4)

    workers = [threading.Thread(target=loads) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    time.sleep(0.2)
    tel.event("prefill_end", seq_id=0)
    summary = tel.stop(tmp_path)

    timeline, events = read_timeline(tmp_path)
    assert summary["files"] == {"timeline": TIMELINE_FILE, "events": EVENTS_FILE}
    assert summary["samples"] == timeline.num_rows >= 3
    assert set(timeline.column_names) >= {"t_s", *HOST_COLUMNS}
    t = timeline.column("t_s").to_pylist()
    assert t == sorted(t) and t[0] >= 0 and t[-1] == pytest.approx(summary["duration_s"], abs=0.05)
    assert events.num_rows == summary["events"] == 42
    names = events.column("name").to_pylist()
    assert names.count("expert_load") == 40
    assert (names[0], names[-1]) == ("prefill_start", "prefill_end")
    ev_t = events.column("t_s").to_pylist()
    assert ev_t[0] >= 0 and ev_t[-1] <= t[-1]
    assert events.column("bytes").to_pylist().count(4096) == 40
    assert summary["overhead"]["sampler_cpu_s"] >= 0
    assert all(timeline.column("rss_bytes").to_pylist())


def test_no_gpu_means_no_gpu_columns_and_a_reason(monkeypatch):
    monkeypatch.setattr(recorder_module, "open_gpu", lambda index: (None, "no GPU telemetry: test machine"))
    tel = Telemetry(20).start()
    summary = tel.stop()
    assert not [c for c in summary["columns"] if c.startswith(GPU_PREFIX)]
    assert summary["gpu"] == {"available": False, "name": None, "reason": "no GPU telemetry: test machine"}


def test_real_nvml_probe_never_crashes():
    summary = Telemetry(20).start().stop()
    gpu_columns = [c for c in summary["columns"] if c.startswith(GPU_PREFIX)]
    if summary["gpu"]["available"]:
        assert gpu_columns
    else:
        assert not gpu_columns and summary["gpu"]["reason"]


def test_disk_counters_follow_the_device_holding_a_path(tmp_path):
    device = block_device_for_path(tmp_path)
    if device is None:
        pytest.skip(f"no block device holds {tmp_path} (tmpfs?)")
    tel = Telemetry(50, path=tmp_path, gpu_index=None).start()
    payload = os.urandom(8 * 2**20)
    with open(tmp_path / "blob", "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    summary = tel.stop(tmp_path)
    assert summary["disk_device"] == device
    written = pq.read_table(tmp_path / TIMELINE_FILE).column("disk_write_bytes").to_pylist()
    assert written == sorted(written)  # cumulative since start
    # Other processes may write to the same disk too, so at least our 8 MiB.
    assert written[-1] >= len(payload)
    # This process's own storage writes count exactly what it flushed (no other process leaks in).
    own = pq.read_table(tmp_path / TIMELINE_FILE).column("process_write_bytes").to_pylist()
    assert own[-1] >= len(payload)


def test_unknown_device_leaves_disk_columns_out():
    tel = Telemetry(20, device="no-such-disk", gpu_index=None).start()
    summary = tel.stop()
    assert "disk_read_bytes" not in summary["columns"]
    assert "no-such-disk" in summary["missing"]["disk"]
    assert summary["disk_device"] is None


def test_events_with_mixed_field_types_stay_readable(tmp_path):
    tel = Telemetry(20, gpu_index=None).start()
    tel.event("note", value=1)
    tel.event("note", value="text")
    tel.event("token", seq_id=0, experts=[1, 2])
    tel.stop(tmp_path)
    _, events = read_timeline(tmp_path)
    assert events.column("value").to_pylist() == ["1", "text", None]
    assert events.column("experts").to_pylist() == [None, None, [1, 2]]


def test_reserved_event_fields_are_refused(tmp_path):
    tel = Telemetry(20, gpu_index=None).start()
    tel.event("x", t_s=1.0)
    with pytest.raises(ValueError, match="t_s"):
        tel.stop(tmp_path)


def test_overhead_tool_reports_both_figures():
    from harness.telemetry.overhead import event_cost_s, measure_overhead

    got = measure_overhead(seconds=0.1, hz=50, trials=1)
    assert len(got["without_telemetry_s"]) == len(got["with_telemetry_s"]) == 1
    assert {"slowdown_pct", "slowdown_cpu_pct", "sampler_cpu_pct_of_run"} <= set(got)
    assert got["sampler_cpu_pct_of_run"] >= 0
    assert event_cost_s(1000) > 0


def test_process_read_bytes_count_direct_reads_exactly(tmp_path):
    import mmap

    path = tmp_path / "experts.bin"
    path.write_bytes(os.urandom(4 * 2**20))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        pytest.skip(f"no O_DIRECT on {tmp_path}: {exc}")
    buf = mmap.mmap(-1, 2**20)  # page-aligned, as O_DIRECT needs
    tel = Telemetry(20, gpu_index=None).start()
    try:
        for i in range(4):
            os.preadv(fd, [buf], i * 2**20)
    finally:
        os.close(fd)
    tel.stop(tmp_path)
    timeline, _ = read_timeline(tmp_path)
    assert timeline.column("process_read_bytes").to_pylist()[-1] == 4 * 2**20
