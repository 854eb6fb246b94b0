"""The I/O floor: decode_floor_ratio equals its hand-computed value on a scripted run; the compute time is
measured once and then read from the cache."""

from __future__ import annotations

import json

import pytest
import torch

from harness.models.packer import pack_paths
from harness.run import execute
from harness.runtime.engine import OffloadEngine
from harness.runtime.floor import ComputeTime, compute_time, decode_floor
from harness.runtime.generation import generate
from harness.runtime.offloaded import OffloadedExperts
from harness.spec import RunSpec
from harness.ssd.readtime import ReadTimeModel
from harness.store.layout import PackIndex
from tests.test_run_counts import ROUTING, ScriptedRouter


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
    model_dir = tiny_model("olmoe")
    pack = pack_paths(model_dir)
    prompts = [([5, 17, 99, 3], None)]
    settings = {"device": "cpu", "decode_mode": "greedy", "max_new_tokens": 5, "warmup_steps": 1}
    refused = compute_time(model_dir, pack, prompts, settings, "budget enforced")
    assert refused == ComputeTime(None, "unavailable: budget enforced")
    first = compute_time(model_dir, pack, prompts, settings, None)
    assert first.s_per_token > 0 and first.source.startswith("measured now (cached in ")
    second = compute_time(model_dir, pack, prompts, settings, "budget enforced")
    assert second.s_per_token == first.s_per_token and second.source.startswith("cached from ")
    other = compute_time(model_dir, pack, [([5, 17], None)], settings, "no")
    assert other.s_per_token is None  # other prompts: another key
    one_thread = settings | {"decode_threads": 1}
    assert compute_time(model_dir, pack, prompts, one_thread, "no").s_per_token is None  # another decode setting
    threads = torch.get_num_threads()
    assert compute_time(model_dir, pack, prompts, one_thread, None).source.startswith("measured now")
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
    floor = metrics["decode_floor"]
    assert "decode_floor_ratio" in metrics
    assert floor["compute_source"].startswith("measured now") and floor["compute_s_per_token"] > 0
    assert floor["decode_bytes_per_token"] == metrics["ssd_read_bytes_per_token"]
