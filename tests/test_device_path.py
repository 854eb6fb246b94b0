"""The GPU compute path, every part but the CUDA calls: device resolution, VRAM sizing, the CLI's one-line
errors, the copy/compute overlap arithmetic, and that the CPU path copies nothing and reports its devices."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from harness.cli import main
from harness.errors import HarnessError
from harness.models.adapters import load_config
from harness.models.packer import pack_paths
from harness.run import kv_cache_bytes, plan_device_tier, resolve_device
from harness.runtime.device import DEVICE_SPANS_FILE, overlap_summary, to_device, write_spans
from harness.runtime.spans import union
from harness.runtime.vram import DEVICE_WORKSPACE_BYTES, device_tier_slots
from harness.spec import RunSpec
from harness.store.layout import PackIndex
from tests.test_strategies import strategy_tokens

MIB = 1 << 20


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stderr.strip()


def assert_one_line_error(code: int, stderr: str, needle: str) -> None:
    assert code == 2, stderr
    assert len(stderr.splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith("error: ") and needle in stderr, stderr


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == "cpu"
    with pytest.raises(HarnessError, match=r"^--device cuda: CUDA is not available here \(.*is False\)$"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda") == "cuda"
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cpu") == "cpu"


def test_device_tier_slots_by_hand():
    # 1 GiB - 100 MiB weights - 512 MiB reserve = 412 MiB; 4 layers of 4 MiB slots: 412 // 16 = 25 per layer.
    tier = device_tier_slots(1024 * MIB, 100 * MIB, 4 * MIB, top_k=2, groups=4, reserve_bytes=512 * MIB)
    assert (tier.slots, tier.groups, tier.to_dict()["slots_total"]) == (25, 4, 100)
    assert device_tier_slots(1024 * MIB, 100 * MIB, 4 * MIB, 2, 4, 512 * MIB, maximum=8).slots == 8
    # Global scope: one group, 412 // 4 = 103 slots.
    assert device_tier_slots(1024 * MIB, 100 * MIB, 4 * MIB, 2, 1, 512 * MIB).slots == 103
    # The default reserve is the documented workspace.
    assert device_tier_slots(1024 * MIB, 0, 4 * MIB, 2).reserve_bytes == DEVICE_WORKSPACE_BYTES == 512 * MIB
    # 644 MiB = 100 + 512 + 2 experts x 4 layers x 4 MiB is the least budget; 643 MiB leaves 1 slot per layer.
    assert device_tier_slots(644 * MIB, 100 * MIB, 4 * MIB, 2, 4, 512 * MIB).slots == 2
    with pytest.raises(HarnessError) as err:
        device_tier_slots(643 * MIB, 100 * MIB, 4 * MIB, 2, 4, 512 * MIB, budget_text="643MiB")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("VRAM budget 643MiB is too small: the non-expert weights take 100 MiB")
    assert "reserve (activations, KV cache, workspace) 512 MiB" in message
    assert "top-2 experts in each of 4 eviction group(s) 32 MiB" in message
    assert message.endswith("use at least 644MiB")


def test_vram_budget_in_the_spec():
    assert "vram_budget" not in RunSpec(model="m").canonical()  # run_ids of runs without it are unchanged
    spec = RunSpec(model="m", device="cuda", vram_budget="8GiB")
    assert spec.vram_budget_bytes == 8 << 30 and spec.canonical()["vram_budget"] == "8GiB"
    assert RunSpec(model="m", vram_budget="8GiB").run_id != RunSpec(model="m").run_id
    with pytest.raises(Exception, match="cannot read size"):
        RunSpec(model="m", vram_budget="lots")


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (("--vram-budget", "4GiB"), "--vram-budget 4GiB sizes expert slots in GPU memory, but this run computes on "),
        (("--vram-budget", "4GiB", "--device", "auto"), "use --device cuda, or drop --vram-budget"),
        (("--vram-budget", "lots", "--device", "cuda"), "cannot read size 'lots'"),
        (("--vram-budget", "4GiB", "--device", "cuda"), "--device cuda: CUDA is not available here"),
    ],
)
def test_vram_budget_cli_errors(tiny_model, tmp_path, monkeypatch, flags, needle):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = run_cli("run", "--model", str(tiny_model("olmoe")), *flags, "--results", str(tmp_path))
    assert_one_line_error(code, err, needle)


def test_vram_budget_too_small_is_refused_before_any_load(tiny_model, tmp_path, monkeypatch):
    """With CUDA present (here: said to be), a budget below one layer's top-k experts is a one-line error from
    the plan, before any weight loads and before the run folder exists."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = tiny_model("olmoe")
    index = PackIndex.load(pack_paths(model)["index"])
    code, err = run_cli(
        "run", "--model", str(model), "--device", "cuda", "--vram-budget", "1MiB", "--results", str(tmp_path)
    )
    assert_one_line_error(code, err, "VRAM budget 1MiB is too small")
    assert f"the non-expert weights take {index.dense_bytes / MIB:.0f} MiB" in err
    assert f"top-{index.top_k} experts in each of {len(index.moe_layers)} eviction group(s)" in err
    assert list(tmp_path.iterdir()) == []


def test_kv_cache_of_a_multimodal_wrapper_is_its_text_models(tiny_model):
    # Qwen3.5-MoE's checkpoint is a wrapper whose config holds the text model's sizes in text_config (a budgeted
    # run planned its KV cache from the wrapper and crashed).
    config = load_config(tiny_model("qwen3_5_moe"))
    text = config.get_text_config()
    assert text is not config and not hasattr(config, "num_hidden_layers")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    by_hand = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 16 * 4
    assert kv_cache_bytes(config, 16, 4) == kv_cache_bytes(text, 16, 4) == by_hand


def test_device_tier_of_a_run_reserves_the_kv_cache(tiny_model):
    model = tiny_model("olmoe")
    index = PackIndex.load(pack_paths(model)["index"])
    config = load_config(model)
    layers = len(index.moe_layers)
    # 10 prompt tokens + 6 new ones of float32 KV cache, the workspace, the weights and 5 slots per layer (+ slack).
    kv = kv_cache_bytes(config, 16, 4)
    assert index.dtype == "float32" and kv > 0
    budget = index.dense_bytes + DEVICE_WORKSPACE_BYTES + kv + 5 * layers * index.stride_bytes + index.stride_bytes - 1
    spec = RunSpec(model=str(model), device="cuda", vram_budget=str(budget), max_new_tokens=6)
    tier = plan_device_tier(spec, index, config, [([1] * 10, None)], "per-layer")
    assert tier is not None and (tier.slots, tier.groups) == (5, layers)
    assert tier.reserve_bytes == DEVICE_WORKSPACE_BYTES + kv
    # Global scope: one group of 5 * layers slots (the slack is less than one slot).
    tier = plan_device_tier(spec, index, config, [([1] * 10, None)], "global")
    assert tier is not None and (tier.slots, tier.groups) == (5 * layers, 1)
    assert plan_device_tier(RunSpec(model=str(model)), index, config, [([1], None)], "global") is None


def test_cpu_weights_are_not_copied():
    weights = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
    moved, copied = to_device(weights, torch.device("cpu"))
    assert moved is weights and copied is None


def test_overlap_of_copy_and_compute_by_hand(tmp_path):
    assert union([(3.0, 4.0), (0.0, 1.0), (0.5, 2.0)]) == [(0.0, 2.0), (3.0, 4.0)]
    spans = [
        ("copy", 0.0, 1.0),
        ("compute", 0.5, 1.5),  # overlaps the first copy by 0.5
        ("copy", 1.2, 2.0),  # overlaps the first compute by 0.3 and the second by 0.2
        ("compute", 1.8, 3.0),
        ("copy", 4.0, 5.0),  # alone
    ]
    summary = overlap_summary(spans)
    assert (summary["copies"], summary["computes"]) == (3, 2)
    assert summary["copy_s"] == pytest.approx(2.8)
    assert summary["compute_s"] == pytest.approx(2.2)
    assert summary["copy_compute_overlap_s"] == pytest.approx(1.0)
    assert summary["copy_hidden_pct"] == pytest.approx(100 / 2.8)
    assert overlap_summary([])["copy_hidden_pct"] is None
    written = pq.read_table(write_spans(spans, tmp_path / DEVICE_SPANS_FILE)).to_pylist()
    assert [(r["kind"], r["t_start_s"], r["t_end_s"]) for r in written] == spans


def test_fiddler_on_the_cpu_computes_everything_on_the_cpu(tiny_model):
    _, strategy, _ = strategy_tokens(tiny_model("olmoe"), "fiddler", 2)
    stats = strategy.stats()
    assert stats["compute_device"] == "cpu" and stats["reduction"] == "cpu-only reduction"
    decisions = stats["cost_model"]["decisions"]
    assert stats["cost_model"]["executed_on"] == {"cpu": sum(decisions.values())}


@pytest.mark.parametrize(
    ("tiers", "needle"),
    [
        ((), "bounds the device tier, but the run has none: add one to --tiers, e.g. --tiers device:lru:"),
        (("--tiers", "device:lru:60,host:lru:64"), "tier device:lru:60 holds 60 slots per eviction group, but "),
    ],
)
def test_vram_budget_bounds_the_device_tier(tiny_model, tmp_path, monkeypatch, tiers, needle):
    """A budget that fits a few slots per layer: the run must name a device tier, and one no larger than that."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = tiny_model("olmoe")
    index = PackIndex.load(pack_paths(model)["index"])
    budget = index.dense_bytes + DEVICE_WORKSPACE_BYTES + 64 * MIB + 8 * len(index.moe_layers) * index.stride_bytes
    code, err = run_cli(
        "run", "--model", str(model), "--device", "cuda", "--vram-budget", str(budget), *tiers,
        "--results", str(tmp_path),
    )  # fmt: skip
    assert_one_line_error(code, err, needle)
