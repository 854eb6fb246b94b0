"""The live tier stack (harness.runtime.tiered_cache): greedy tokens of every tier configuration equal the fully
resident model's; a run's per-tier counts equal the simulator's on the run's own trace; bad tiers exit 2."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from harness.cache.tiers import parse_tiers
from harness.cli import main
from harness.models.loader import reference_model
from harness.models.packer import pack_paths
from harness.run import execute
from harness.runtime.engine import OffloadEngine
from harness.runtime.expert_io import make_backend
from harness.runtime.generation import generate
from harness.runtime.tiered_cache import TieredExperts
from harness.spec import RunSpec
from harness.store.layout import PackIndex
from harness.store.reader import ExpertReader
from harness.trace.schema import read_trace
from harness.trace.simulate import build_replay
from harness.trace.simulate_tiers import run_tier_replay

PROMPT = [5, 17, 99, 3, 250, 7, 8, 100, 42, 11]
NEW_TOKENS = 12
CONFIGS = {
    "device only": "device:lru:{slots}",
    "host slots only": "host:lru:{slots}",
    "page cache only": "pagecache:{slots}",
    "device + host": "device:lru:{slots},host:lfu:{slots}",
    "device + page cache": "device:lru:{slots},pagecache:{slots}",
}


@pytest.fixture(scope="module")
def resident(tiny_model):
    """(model folder, pack index, the fully resident model's greedy tokens) per architecture, made once."""
    made = {}

    def get(arch: str):
        if arch not in made:
            model_dir = tiny_model(arch)
            index = PackIndex.load(pack_paths(model_dir)["index"])
            made[arch] = model_dir, index, generate(reference_model(model_dir, index), PROMPT, NEW_TOKENS, "greedy")
        return made[arch]

    return get


@pytest.mark.parametrize("arch", ["olmoe", "mixtral"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_tier_configuration_matches_the_resident_model(resident, arch, config):
    """At the minimum capacity (top-k slots per layer: prefill steps stream through scratch) and at 50%."""
    model_dir, index, reference = resident(arch)
    paths = pack_paths(model_dir)
    for slots in sorted({index.top_k, index.num_experts // 2}):
        tiers = parse_tiers(CONFIGS[config].format(slots=slots))
        engine = OffloadEngine(model_dir, index, paths["experts"], paths["dense"])
        source = engine.configure_tiers(tiers, "per-layer", 0, 2)
        try:
            tokens = generate(engine.model, PROMPT, NEW_TOKENS, "greedy", ctx=engine.ctx).token_ids
        finally:
            engine.close()
        assert tokens == reference.token_ids, f"{arch} {config} with {slots} slots"
        assert source.stack.total(0).misses > 0 and source.stats.records  # bytes did move between tiers
        if config == "host slots only":  # one tier: the plain cache's reads
            assert len(source.stats.records) == source.stack.total(0).misses


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_the_device_tier_hands_out_the_packs_bytes(tiny_model, device):
    """The device pool (on CUDA: copy stream, events, pinned host pool) serves the bytes the plain cache reads,
    for hits, copies of host hits, SSD reads and a step wider than the device tier (its scratch slot)."""
    model_dir = tiny_model("olmoe")
    paths = pack_paths(model_dir)
    index = PackIndex.load(paths["index"])
    reader = ExpertReader(paths["experts"], index)
    io, _ = make_backend(reader, "threads", 2)
    k, layer = index.top_k, index.moe_layers[0]
    tiered = TieredExperts(index, parse_tiers(f"device:lru:{k},host:lru:{k + 1}"), "per-layer", 0, io, 2, device)
    plain = TieredExperts(index, parse_tiers(f"host:lru:{index.num_experts}"), "per-layer", 0, io, 2)
    try:
        for now, experts in enumerate([[0, 1], [2, 3], [0, 1], [2, 3], [1, 3, 4], [0, 4]]):
            got = {e: {n: t.cpu() for n, t in w.items()} for e, w in tiered.fetch(layer, experts, now, "decode")}
            want = {e: {n: t.clone() for n, t in w.items()} for e, w in plain.fetch(layer, experts, now, "decode")}
            assert sorted(got) == sorted(want) == sorted(experts)
            for e, weights in got.items():
                assert all(torch.equal(weights[n], want[e][n]) for n in weights), (now, e)
        device_tier, host_tier = tiered.stack.total(0), tiered.stack.total(1)
        assert device_tier.hits > 0 and host_tier.hits > 0 and host_tier.misses > 0
    finally:
        tiered.close()
        plain.close()
        io.close()
        reader.close()


def _run(tmp_path, model, tiers, scope="per-layer"):
    spec = RunSpec(
        model=str(model), tiers=tiers, scope=scope, max_prompts=2, max_new_tokens=10, warmup_steps=0, min_steady_s=0
    )
    result = execute(spec, tmp_path)
    assert result["status"] == "ok", result.get("error")
    assert result["spec"]["tiers"] == tiers
    replay = build_replay(read_trace(tmp_path / spec.run_id / "trace.parquet"))
    return result, run_tier_replay(replay, parse_tiers(tiers), scope)


def test_live_slot_tiers_equal_the_simulator_on_the_runs_trace(tiny_model, tmp_path):
    result, simulated = _run(tmp_path, tiny_model("qwen3_moe"), "device:lru:2,host:lfu:4")
    metrics = result["metrics"]
    assert metrics["tiers"] == simulated.rows()  # every tier's counts, shares and bytes per token, exactly
    rows = metrics["tiers"]
    assert rows[0]["misses"] == rows[1]["accesses"] and rows[0]["hits"] > 0 and rows[1]["hits"] > 0
    # The hierarchy's hits: served by some tier; misses: read from the SSD (the host tier's misses).
    for phase in ("prefill", "decode"):
        for layer, (hits, misses) in metrics["hits"][phase]["per_layer"].items():
            host = simulated.counts[1][phase][int(layer)]
            assert misses == host.misses
            assert hits + misses == simulated.counts[0][phase][int(layer)].accesses
    assert metrics["ssd_read_bytes"] == simulated.ssd_reads * result["resolved"]["expert_stride_bytes"]
    assert result["resolved"]["tiers"] == ["device:lru:2", "host:lfu:4"]


def test_a_page_cache_tier_reports_its_live_classification_beside_the_model(tiny_model, tmp_path):
    result, simulated = _run(tmp_path, tiny_model("olmoe"), "host:lru:2,pagecache:6", scope="global")
    rows = result["metrics"]["tiers"]
    live_keys = {"live_hits", "live_misses", "live_hit_rate", "model_minus_live_hit_rate"}
    assert [{k: v for k, v in row.items() if k not in live_keys} for row in rows] == simulated.rows()
    host, page = rows
    assert live_keys.isdisjoint(host) and live_keys <= set(page)
    assert page["live_hits"] + page["live_misses"] == page["accesses"] == host["misses"]
    assert page["model_minus_live_hit_rate"] == pytest.approx(page["hit_rate"] - page["live_hit_rate"])
    assert result["resolved"]["io_engine"] == "buffered-pagecache"
    # SSD bytes: only what the device read (a read the page cache served is no SSD read).
    stride = result["resolved"]["expert_stride_bytes"]
    assert result["metrics"]["ssd_read_bytes"] <= page["live_misses"] * stride
    decode = result["metrics"]["hits"]["decode"]
    assert decode["hits"] + decode["misses"] == simulated.total(0, "decode").accesses


def _cli_error(*args: str) -> str:
    result = CliRunner().invoke(main, ["run", *args])
    err = result.stderr.strip()
    assert result.exit_code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize(
    ("tiers", "extra", "needle"),
    [
        ("device:lru:1,host:lru:8", [], "tier device:lru:1 holds 1 slots, fewer than the model's top-2"),
        ("host:lru:1000000", ["--ram-budget", "4GiB"], "but the RAM budget leaves"),
        ("host:lru:4,pagecache:64", ["--io-engine", "direct"], "a page-cache tier needs buffered reads"),
        ("device:lru:4", ["--strategy", "prefetch"], "tiers run with strategy cache only"),
    ],
)
def test_bad_tiers_exit_2_in_one_line(tiny_model, tmp_path, tiers, extra, needle):
    err = _cli_error("--model", str(tiny_model("olmoe")), "--tiers", tiers, "--results", str(tmp_path), *extra)
    assert needle in err
