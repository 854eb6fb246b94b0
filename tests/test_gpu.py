"""The GPU compute path on a real CUDA device (marked `gpu`: skipped, with the reason, where torch sees none).

Exactness: offloaded greedy tokens with the compute on the GPU equal the fully resident model's on the GPU;
copies from pinned host memory are finished before their source may be reused; Fiddler's two sides run on
the real devices; a run's telemetry timeline has NVML columns on the clock of the run's events, and the
device's copy/compute intervals come back on that clock too.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from harness.models.loader import reference_model
from harness.models.packer import pack_paths
from harness.run import execute
from harness.runtime.engine import OffloadEngine
from harness.runtime.generation import generate
from harness.runtime.strategies import CacheRequest, make_strategy
from harness.runtime.strategies.fiddler import CostModel
from harness.spec import RunSpec
from harness.store.layout import PackIndex

pytestmark = pytest.mark.gpu

PROMPT = [5, 17, 99, 3, 250, 7, 8, 100, 42, 11]
NEW_TOKENS = 12
CUDA = "cuda"


def resident_on_gpu(model_dir) -> list[int]:
    index = PackIndex.load(pack_paths(model_dir)["index"])
    model = reference_model(model_dir, index).to(CUDA)
    return generate(model, PROMPT, NEW_TOKENS, "greedy").token_ids


def engine_on_gpu(model_dir) -> OffloadEngine:
    paths = pack_paths(model_dir)
    return OffloadEngine(model_dir, PackIndex.load(paths["index"]), paths["experts"], paths["dense"], device=CUDA)


@pytest.mark.parametrize("arch", ["olmoe", "mixtral"])
def test_offloaded_greedy_on_cuda_matches_resident_on_cuda(arch, tiny_model):
    model_dir = tiny_model(arch)
    reference = resident_on_gpu(model_dir)
    index = PackIndex.load(pack_paths(model_dir)["index"])
    for slots in sorted({index.top_k, index.num_experts // 2}):
        engine = engine_on_gpu(model_dir)
        cache = engine.configure_cache(slots, "per-layer", "lru", seed=0, io_threads=2)
        try:
            assert engine.model.device.type == CUDA
            tokens = generate(engine.model, PROMPT, NEW_TOKENS, "greedy", ctx=engine.ctx).token_ids
        finally:
            engine.close()
        assert tokens == reference, f"{arch} with {slots} slots per layer"
        assert cache.book.total().misses > 0


def test_copy_from_pinned_memory_is_done_before_the_source_is_reused(tiny_model):
    """An expert's weights from pinned host memory: the output equals the same expert with its weights already on
    the GPU, bit for bit, even when the host buffer is overwritten right after the call returns."""
    engine = engine_on_gpu(tiny_model("olmoe"))
    try:
        math = engine.modules[0].math
        shapes = {t.name: (t.shape, getattr(torch, t.dtype or engine.index.dtype)) for t in engine.index.tensors}
        gen = torch.Generator().manual_seed(0)
        host = {n: torch.randn(*s, generator=gen).to(d).pin_memory() for n, (s, d) in shapes.items()}
        on_gpu = {n: t.to(CUDA) for n, t in host.items()}
        rows = torch.randn(3, engine.config.hidden_size, generator=gen).to(math.dtype).to(CUDA)
        routing = torch.ones(3, 1, dtype=rows.dtype, device=CUDA)
        expected = math(on_gpu, rows, routing)
        got = math(host, rows, routing)
        for tensor in host.values():
            tensor.zero_()  # the slot is rewritten as soon as the caller moves on
        torch.cuda.synchronize()
        assert torch.equal(got, expected)
    finally:
        engine.close()


def fiddler_tokens(model_dir, cost_model: CostModel | None):
    engine = engine_on_gpu(model_dir)
    index = engine.index
    strategy = make_strategy("fiddler")
    source = strategy.build(engine, CacheRequest(index.top_k * len(index.moe_layers), "global", "lru", 0, 2))
    if cost_model is not None:
        strategy.cost_model = cost_model  # type: ignore[attr-defined]
    engine.use_source(source, strategy)
    try:
        tokens = generate(engine.model, PROMPT, NEW_TOKENS, "greedy", ctx=engine.ctx).token_ids
        strategy.finish()
    finally:
        engine.close()
    return tokens, strategy.stats()


def test_fiddler_on_cuda(tiny_model):
    model_dir = tiny_model("olmoe")
    # Copying is free: every expert computes on the GPU, so the tokens are the resident GPU model's.
    tokens, stats = fiddler_tokens(model_dir, CostModel(t_cpu_token_s=1.0, t_copy_s=0.0))
    assert tokens == resident_on_gpu(model_dir)
    assert stats["compute_device"].startswith(CUDA) and set(stats["cost_model"]["executed_on"]) == {CUDA}
    # The CPU is free: experts outside the pinned set compute on the CPU from host memory.
    tokens, stats = fiddler_tokens(model_dir, CostModel(t_cpu_token_s=0.0, t_copy_s=1.0))
    executed = stats["cost_model"]["executed_on"]
    assert len(tokens) == NEW_TOKENS and executed["cpu"] > 0
    assert sum(executed.values()) == sum(stats["cost_model"]["decisions"].values())
    # Measured constants: the copy time is measurable here.
    _, stats = fiddler_tokens(model_dir, None)
    assert stats["cost_model"]["t_copy_s"] is not None


def test_run_on_cuda_has_nvml_columns_and_device_spans_on_the_run_clock(tiny_model, tmp_path):
    spec = RunSpec(
        model=str(tiny_model("mixtral")),
        device="cuda",
        cache_experts="50%",
        prompt="the quick brown fox jumps over the lazy dog",
        decode="greedy",
        max_new_tokens=12,
        warmup_steps=0,
        min_steady_s=0,
        telemetry_hz=50,
    )
    result = execute(spec, tmp_path)
    assert result["status"] == "ok", result.get("error")
    assert result["resolved"]["device"] == CUDA
    run_dir = tmp_path / result["run_id"]
    timeline = pq.read_table(run_dir / "timeline.parquet")
    events = pq.read_table(run_dir / "events.parquet")
    assert {"gpu_util_pct", "gpu_mem_used_bytes"} <= set(timeline.column_names), result["telemetry"]["missing"]
    t = timeline.column("t_s").to_pylist()
    tokens = [
        ts
        for ts, name in zip(events.column("t_s").to_pylist(), events.column("name").to_pylist(), strict=True)
        if name == "token"
    ]
    assert tokens and t[0] <= min(tokens) and max(tokens) <= t[-1]  # one clock: the events lie inside the samples
    spans = pq.read_table(run_dir / "device_spans.parquet").to_pylist()
    kinds = {row["kind"] for row in spans}
    assert kinds == {"copy", "compute"}
    assert all(t[0] <= row["t_start_s"] <= row["t_end_s"] <= t[-1] for row in spans)
    overlap = result["metrics"]["device_copy_compute"]
    assert overlap["copies"] > 0 and overlap["computes"] > 0 and overlap["compute_s"] > 0
