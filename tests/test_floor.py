"""The I/O floor: decode_floor_ratio equals its hand-computed value on a scripted run; the compute time is
measured once and then read from the cache, unless other processes loaded the machine while it was measured."""

from __future__ import annotations

import gc
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from harness.models.loader import into_process_memory, reference_model
from harness.models.packer import pack_paths
from harness.run import execute
from harness.runtime import floor
from harness.runtime.engine import OffloadEngine
from harness.runtime.floor import ComputeTime, compute_time, decode_floor
from harness.runtime.generation import generate
from harness.runtime.offloaded import OffloadedExperts
from harness.spec import RunSpec
from harness.ssd.readtime import ReadTimeModel
from harness.store.layout import PackIndex
from tests.test_run_counts import ROUTING, ScriptedRouter

PROMPTS = [([5, 17, 99, 3], None)]
SETTINGS = {"device": "cpu", "decode_mode": "greedy", "max_new_tokens": 5, "warmup_steps": 1}
"""The compute-time tests' prompts and decode settings (both part of the cache key)."""


def test_floor_ratio_by_hand(tiny_model):
    model_dir = tiny_model("olmoe")
    paths = pack_paths(model_dir)
    index = PackIndex.load(paths["index"])
    engine = OffloadEngine(model_dir, index, paths["experts"], paths["dense"])
    for block in [m for m in engine.model.modules() if isinstance(getattr(m, "experts", None), OffloadedExperts)]:
        block.gate = ScriptedRouter()
    cache = engine.configure_cache(2, "per-layer", "lru", seed=0, io_threads=2)
    log = generate(engine.model, [7], len(ROUTING), "greedy", ctx=engine.ctx)
    engine.close()
    layers, stride = len(index.moe_layers), index.stride_bytes
    # LRU with 2 slots reads 6 experts per layer over the 4 decode steps (tests/test_run_counts.py).
    decode_steps = len(ROUTING) - 1
    assert cache.stats.bytes_by_phase["decode"] == 6 * layers * stride
    bytes_per_token = cache.stats.bytes_by_phase["decode"] / decode_steps
    measured = sum(log.step_s) / decode_steps
    # A profile that reads expert-sized blocks at 1 MB/s at depth 2 (4 MB/s at depth 8, unused here).
    model = ReadTimeModel(bw={"randread": {stride: {2: 1e6, 8: 4e6}}}, lat={}, source="hand", device=None)
    compute = ComputeTime(1e-3, "given")
    out = decode_floor(measured, bytes_per_token, compute, model, stride, queue_depth=2)
    io_s = 6 * layers * stride / 4 / 1e6
    assert io_s > 1e-3  # the I/O term is the floor here
    assert out["decode_floor_ratio"] == pytest.approx(measured / io_s, rel=1e-12)
    assert out["decode_floor"]["bound"] == "io" and out["decode_floor"]["io_s_per_token"] == pytest.approx(io_s)
    # Compute-bound: a compute time above the I/O term is the floor.
    slow = decode_floor(measured, bytes_per_token, ComputeTime(10 * io_s, "given"), model, stride, 2)
    assert slow["decode_floor_ratio"] == pytest.approx(measured / (10 * io_s))
    # Without a profile there is no floor, and the result says why.
    none = decode_floor(measured, bytes_per_token, compute, None, stride, 2)
    assert none["decode_floor_ratio"] is None
    assert none["decode_floor"]["io_source"] == "unavailable: no SSD profile"


def test_compute_time_measured_once_then_cached(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(floor, "cpu_sample", lambda: floor.CpuSample(0.0, 0.0, 0.0, 1.0))  # a quiet machine
    model_dir = tiny_model("olmoe")
    pack = pack_paths(model_dir)
    refused = compute_time(model_dir, pack, PROMPTS, SETTINGS, "budget enforced")
    assert refused == ComputeTime(None, "unavailable: budget enforced")
    first = compute_time(model_dir, pack, PROMPTS, SETTINGS, None)
    assert first.s_per_token > 0 and first.source.startswith("measured now (cached in ")
    second = compute_time(model_dir, pack, PROMPTS, SETTINGS, "budget enforced")
    assert second.s_per_token == first.s_per_token and second.source.startswith("cached from ")
    other = compute_time(model_dir, pack, [([5, 17], None)], SETTINGS, "no")
    assert other.s_per_token is None  # other prompts: another key
    one_thread = SETTINGS | {"decode_threads": 1}
    assert compute_time(model_dir, pack, PROMPTS, one_thread, "no").s_per_token is None  # another decode setting
    threads = torch.get_num_threads()
    assert compute_time(model_dir, pack, PROMPTS, one_thread, None).source.startswith("measured now")
    assert torch.get_num_threads() == threads  # put back after the decode steps


def test_decode_threads_unset_keeps_the_run_id():
    spec = RunSpec(model="m", prompt="p")
    assert "decode_threads" not in spec.canonical()  # specs written before the setting keep their run ids
    assert RunSpec(model="m", prompt="p", decode_threads=1).canonical()["decode_threads"] == 1


def test_every_result_has_the_floor(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    spec = RunSpec(
        model=str(tiny_model("olmoe")),
        cache_experts="50%",
        prompt="the quick brown fox jumps over the lazy dog",
        decode="greedy",
        max_new_tokens=6,
        warmup_steps=1,
        telemetry_hz=5,
    )
    metrics = json.loads(json.dumps(execute(spec, tmp_path / "results")))["metrics"]
    doc = metrics["decode_floor"]
    assert "decode_floor_ratio" in metrics
    assert doc["compute_source"].startswith("measured now") and doc["compute_s_per_token"] > 0
    assert doc["decode_bytes_per_token"] == metrics["ssd_read_bytes_per_token"]
    # Half the experts cached: decode steps read, so the disk was busy for part of them, never more than all.
    assert metrics["ssd_read_bytes_per_token"] > 0 and 0 < metrics["decode_device_busy_share"] <= 1


def test_machine_load_by_hand(monkeypatch):
    """Others' share = (machine busy time - this process's CPU time) / machine total, over the measurement."""
    monkeypatch.setattr(floor.os, "getloadavg", lambda: (3.5, 0.0, 0.0))
    before = floor.CpuSample(wall_s=100.0, process_cpu_s=1.0, busy_cpu_s=50.0, total_cpu_s=400.0)
    # 10 s on 4 CPUs (40 CPU-s): the process ran 9.5 CPU-s, the machine was busy 17.5: others 8 of 40.
    load = floor.machine_load(before, floor.CpuSample(110.0, 10.5, 67.5, 440.0))
    assert load == floor.MachineLoad(wall_s=10.0, process_cpu_s=9.5, others_cpu_share=0.2, loadavg_1m=3.5)
    assert load.loaded and floor.OTHERS_CPU_SHARE_MAX < 0.2
    quiet = floor.machine_load(before, floor.CpuSample(110.0, 10.5, 61.5, 440.0))  # others 2 of 40
    assert quiet.others_cpu_share == pytest.approx(0.05) and not quiet.loaded
    # This process's time counted, when the machine's counter lags it, is never a negative share.
    assert floor.machine_load(before, floor.CpuSample(110.0, 10.5, 55.0, 440.0)).others_cpu_share == 0.0


def test_a_compute_time_measured_under_load_is_not_cached(tiny_model, tmp_path, monkeypatch):
    """Scripted load readings: a measurement while others took 40% of the CPUs serves its run, says so, and is
    not cached (the next run measures again); a quiet one is cached with its load; a cache file from before
    loads were recorded is not trusted."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(floor.os, "getloadavg", lambda: (1.0, 0.0, 0.0))
    measured: list[int] = []

    def fake_measure(*args, **kwargs):
        measured.append(1)
        return 0.02, 5

    samples = iter(
        [
            floor.CpuSample(0.0, 0.0, 0.0, 0.0),
            floor.CpuSample(10.0, 10.0, 18.0, 20.0),  # 2 CPUs for 10 s: others 8 of 20 CPU-s
            floor.CpuSample(20.0, 10.0, 18.0, 20.0),
            floor.CpuSample(30.0, 20.0, 28.5, 40.0),  # others 0.5 of 20
        ]
    )
    monkeypatch.setattr(floor, "measure_compute", fake_measure)
    monkeypatch.setattr(floor, "cpu_sample", lambda: next(samples))
    pack = pack_paths(tiny_model("olmoe"))
    loaded = compute_time(Path("m"), pack, PROMPTS, SETTINGS, None)
    assert loaded.s_per_token == 0.02 and loaded.load.others_cpu_share == pytest.approx(0.4)
    assert loaded.source.startswith("measured now under load (other processes took 40% of the CPUs")
    assert not (tmp_path / "cache").exists()
    out = decode_floor(0.05, None, loaded, None, 4096, 1)["decode_floor"]
    assert out["compute_under_load"] is True and out["compute_load"]["others_cpu_share"] == pytest.approx(0.4)
    quiet = compute_time(Path("m"), pack, PROMPTS, SETTINGS, None)  # measured again
    assert len(measured) == 2 and quiet.source.startswith("measured now (cached in ")
    (path,) = (tmp_path / "cache" / "compute").iterdir()
    doc = json.loads(path.read_text())
    assert doc["load"]["others_cpu_share"] == pytest.approx(0.025) and doc["load"]["under_load"] is False
    cached = compute_time(Path("m"), pack, PROMPTS, SETTINGS, "no measuring")
    assert len(measured) == 2 and cached.s_per_token == 0.02 and cached.load == quiet.load
    assert doc["measured_at"] == quiet.measured_at == cached.measured_at
    when = floor.measured_when(doc["measured_at"])
    assert cached.source == f"cached from {path} ({when}, while other processes took 2% of the CPUs)"
    assert decode_floor(0.05, None, cached, None, 4096, 1)["decode_floor"]["compute_measured_at"] == doc["measured_at"]
    assert decode_floor(0.05, None, cached, None, 4096, 1)["decode_floor"]["compute_under_load"] is False
    # A version-1 file says nothing of its load: not trusted.
    path.write_text(json.dumps({"schema": "harness.compute/1", "s_per_token": 0.5, "steady_steps": 5}))
    assert compute_time(Path("m"), pack, PROMPTS, SETTINGS, "no measuring").s_per_token is None


def test_when_a_cached_compute_time_was_measured():
    now = datetime(2026, 11, 30, 14, 0, tzinfo=UTC)
    assert floor.measured_when("2026-11-29T12:30:00+00:00", now) == "measured 2026-11-29T12:30Z, 25.5 h ago"
    assert floor.measured_when(None, now) == "measured at an unknown time"  # a file written before it was recorded
    assert floor.measured_when("yesterday", now) == "measured at an unknown time"


def test_the_compute_cache_folder_can_be_set_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    assert floor.compute_cache_dir() == tmp_path / "cache" / "compute"
    monkeypatch.setenv(floor.COMPUTE_CACHE_ENV, str(tmp_path / "round-0"))
    assert floor.compute_cache_dir() == tmp_path / "round-0"


def _mapped_kib(folder: Path) -> int:
    """Resident KiB of this process mapped from files under `folder` (/proc/self/smaps)."""
    total, current = 0, ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            current = fields[5] if len(fields) > 5 else ""
        elif fields and fields[0] == "Rss:" and current.startswith(str(folder)):
            total += int(fields[1])
    return total


def _private_copy(tiny_model, tmp_path: Path) -> Path:
    """The tiny model in a folder of this test's own: no other test's objects map its files."""
    return Path(shutil.copytree(tiny_model("olmoe"), tmp_path / "model"))


def test_weights_copied_into_process_memory_compute_the_same(tiny_model, tmp_path):
    model_dir = _private_copy(tiny_model, tmp_path)
    model = reference_model(model_dir)
    ids = torch.tensor([[5, 17, 99, 3]])
    with torch.no_grad():
        before = model(ids).logits
    assert _mapped_kib(model_dir) > 0  # transformers maps the checkpoint: else this test shows nothing
    into_process_memory(model)
    gc.collect()
    assert _mapped_kib(model_dir) == 0
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_the_compute_is_measured_with_no_weight_mapped_from_the_checkpoint(tiny_model, tmp_path, monkeypatch):
    model_dir = _private_copy(tiny_model, tmp_path)
    mapped_while_decoding: list[int] = []

    def fake_generate(model, ids, max_new_tokens, mode, ref, decode_threads=None):
        gc.collect()
        mapped_while_decoding.append(_mapped_kib(model_dir))
        return SimpleNamespace(step_s=[0.01] * max_new_tokens)

    monkeypatch.setattr("harness.runtime.generation.generate", fake_generate)
    assert floor.measure_compute(model_dir, [([5, 17], None)], 4, "greedy", 1) == (0.01, 3)
    assert mapped_while_decoding == [0]
