"""One measurement: plan (resolve and check, nothing heavy) -> measure (trackers as context managers)
-> assess (validity) -> the typed result.

Writes `<results>/<run_id>/result.json` (typed, versioned, atomic), `trace.parquet` and, when the
telemetry sampler runs, `timeline.parquet`, holding the run folder's lock throughout. Knows nothing of
policies or model internals beyond the engine's interface.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from harness import paths
from harness.budget import BudgetEnforcement, budget_status, current_enforcement
from harness.cache.book import AccessCounts
from harness.cache.tiers import SEMANTICS, TierSpec, check_tiers_budget, parse_tiers
from harness.errors import HarnessError
from harness.identity import RunIdentity, run_identity
from harness.iomem import base_page_note
from harness.keys import PHASES, Scope
from harness.models.adapters import load_config
from harness.models.factory import HARNESS_MARKER
from harness.models.locate import model_name, resolve_model_dir
from harness.models.packer import pack_model, pack_paths
from harness.process import claim_run_dir
from harness.result_model import RESULT_FILE, RunResult
from harness.results import Validity, environment
from harness.runtime.device import DEVICE_SPANS_FILE, DeviceTimeline, overlap_summary, write_spans
from harness.runtime.engine import OffloadEngine, check_live_policy
from harness.runtime.floor import run_floor_metrics
from harness.runtime.generation import DecodeMode, SequenceLog, generate
from harness.runtime.recorder import RoutingRecorder, trace_meta
from harness.runtime.spans import covered_s, union
from harness.runtime.strategies import PEERS, CacheRequest, Strategy, check_strategy, make_strategy
from harness.runtime.strategies.base import split_spec
from harness.runtime.tiered_cache import TieredExperts
from harness.runtime.timing import percentiles, steady_windows, timing_metrics
from harness.runtime.vram import DEVICE_WORKSPACE_BYTES, DeviceTier, device_tier_slots
from harness.spec import RunSpec, cache_experts_slots, check_tiers
from harness.ssd.devices import VOLATILE_FILESYSTEMS, block_device_for_path, describe_path
from harness.ssd.readtime import profile_for_path
from harness.store.layout import PackIndex
from harness.store.placement import place_expert_file
from harness.store.reader import IoRecord
from harness.telemetry.probes import process_io_bytes
from harness.telemetry.recorder import EVENTS_FILE, TIMELINE_FILE, Telemetry
from harness.trace.schema import PHASE_NAMES, Trace, read_trace
from harness.trace.simulate_tiers import tier_rows
from harness.trace.stats import routing_stats
from harness.workloads import PromptItem, select_prompts

log = logging.getLogger(__name__)

WORKSPACE_RESERVE_BYTES = 256 << 20
"""Memory kept free of expert slots for activations, allocator slack and the Python heap (bytes).
A documented default; the run records it and the measured peak RSS so it can be checked."""
READS_FILE = "expert_reads.parquet"


@dataclass
class Progress:
    """Callbacks the CLI uses to show tokens as they come; all optional."""

    on_prompt: Callable[[int, int, PromptItem], None] | None = None
    on_token: Callable[[int], None] | None = None


def kv_cache_bytes(config: Any, tokens: int, dtype_bytes: int) -> int:
    """Keys and values of every decoder layer for `tokens` tokens (a multimodal wrapper's: its text model's)."""
    config = config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * tokens * dtype_bytes


def resolve_slots(
    spec: RunSpec, index: PackIndex, baseline_bytes: int, workspace_bytes: int, scope: str | None = None
) -> tuple[int, str, int]:
    """Cache capacity in slots per eviction group (of `scope`, default the spec's), how it was derived, and the
    expert slots the budget holds in all groups: with a RAM budget, every slot its free bytes hold, also past the
    model's experts (a strategy that keeps memory beside its expert slots, a shadow model, takes it from there)."""
    scope = scope or spec.scope
    layers, experts, k = len(index.moe_layers), index.num_experts, index.top_k
    groups = layers if scope == "per-layer" else 1
    maximum = experts if scope == "per-layer" else experts * layers
    total = None
    if spec.cache_experts is not None:
        slots = cache_experts_slots(spec.cache_experts, maximum)
        how = f"cache_experts={spec.cache_experts.strip()}"
    elif spec.ram_budget_bytes is not None:
        free = spec.ram_budget_bytes - baseline_bytes - workspace_bytes
        slots = max(free, 0) // (index.stride_bytes * groups)
        total = max(free, 0) // index.stride_bytes
        how = (
            f"ram_budget {spec.ram_budget_bytes} B - measured baseline {baseline_bytes} B - workspace "
            f"{workspace_bytes} B"
        )
        if slots < k:
            need = baseline_bytes + workspace_bytes + k * groups * index.stride_bytes
            raise HarnessError(
                f"RAM budget {spec.ram_budget} is too small: the non-expert weights and runtime take "
                f"{baseline_bytes / 2**20:.0f} MiB, the workspace {workspace_bytes / 2**20:.0f} MiB, and one "
                f"layer's top-{k} experts {k * groups * index.stride_bytes / 2**20:.0f} MiB; "
                f"use at least {math.ceil(need / 2**20)}MiB"
            )
    else:
        slots, how = maximum, "all experts (no budget given)"
    if slots < k:
        raise HarnessError(f"the cache needs at least top_k={k} slots per eviction group (got {slots})")
    slots = min(slots, maximum)
    return slots, how, slots * groups if total is None else total


def _read_spans(records: list[IoRecord]) -> list[tuple[float, float]]:
    """(start, end) of every expert read, seconds on `time.perf_counter()` (the decode steps' clock)."""
    return [(r.start_ns / 1e9, r.end_ns / 1e9) for r in records]


def _device_busy_share(cache: Any, records: list[IoRecord], windows: list[tuple[float, float]]) -> float | None:
    """Share of the steady decode steps' time (`windows`) during which at least one expert read was on the device:
    near 1 the disk was the bottleneck and kept busy, well below 1 it waited for the model to ask. A read the page
    cache served whole is not on the device; None where reads go through a mapped file (page faults leave no
    spans) or none was recorded."""
    if _mapped_bytes(cache) is not None:
        return None
    total = sum(end - start for start, end in windows)
    spans = _read_spans([r for r in records if r.device_bytes])
    return covered_s(spans, windows) / total if spans and total else None


def _hits(counts: dict[str, dict[int, AccessCounts]]) -> dict[str, Any]:
    """Hits and misses per phase, in all and per layer (a miss: an expert read from the device)."""
    out: dict[str, Any] = {}
    for phase in PHASES:
        per_layer = {str(layer): [c.hits, c.misses] for layer, c in counts[phase].items()}
        hits, misses = sum(c.hits for c in counts[phase].values()), sum(c.misses for c in counts[phase].values())
        out[phase] = {"hits": hits, "misses": misses, "per_layer": per_layer}
    return out


def _hit_rate(hits: dict[str, Any], phase: str) -> float:
    accesses = hits[phase]["hits"] + hits[phase]["misses"]
    return hits[phase]["hits"] / accesses if accesses else 0.0


def preflight(spec: RunSpec) -> tuple[Path, PackIndex]:
    """Checks that need no model load: the model resolves and packs, the policy runs live, and the budget
    can hold this process (interpreter and libraries as measured now), the non-expert weights, the
    workspace and one layer's top-k experts (or the spec's tiers)."""
    device = resolve_device(spec.device)
    check_vram_budget(spec, device)
    check_live_policy(spec.policy)
    check_strategy(spec.strategy)
    model_dir = resolve_model_dir(spec.model)
    load_config(model_dir)  # refuses an unsupported architecture with the reason
    # The expert file this run reads is verified in full once: the pack here, its copy on --ssd in placement.
    index, _ = pack_model(model_dir, verify=spec.ssd is None)
    if spec.ram_budget_bytes is not None:
        groups = len(index.moe_layers) if spec.scope == "per-layer" else 1
        runtime = psutil.Process().memory_info().rss
        need = runtime + index.dense_bytes + WORKSPACE_RESERVE_BYTES + index.top_k * groups * index.stride_bytes
        if spec.ram_budget_bytes < need:
            raise HarnessError(
                f"RAM budget {spec.ram_budget} is too small: the runtime takes {runtime / 2**20:.0f} MiB, the "
                f"non-expert weights {index.dense_bytes / 2**20:.0f} MiB, the workspace "
                f"{WORKSPACE_RESERVE_BYTES / 2**20:.0f} MiB and one layer's top-{index.top_k} experts "
                f"{index.top_k * groups * index.stride_bytes / 2**20:.0f} MiB; "
                f"use at least {math.ceil(need / 2**20)}MiB"
            )
        if spec.tiers is not None:
            free = expert_ram_free(spec.ram_budget_bytes, runtime, index.dense_bytes)
            tiers = parse_tiers(spec.tiers)
            check_tiers_budget(tiers, index.stride_bytes, len(index.moe_layers), spec.scope, device, free)
    return model_dir, index


def expert_ram_free(budget_bytes: int, runtime_bytes: int, dense_bytes: int) -> int:
    """RAM a budget leaves for expert tiers: less this process's runtime (interpreter and libraries), the
    non-expert weights and the workspace reserve."""
    return budget_bytes - runtime_bytes - dense_bytes - WORKSPACE_RESERVE_BYTES


def resolve_device(requested: str) -> str:
    """Where non-expert weights, hidden states and expert compute live: 'cpu', or 'cuda' (`auto`: cuda where
    torch sees a CUDA device, else cpu)."""
    import torch

    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        cuda = torch.version.cuda
        why = "this torch build has no CUDA" if cuda is None else f"torch built for CUDA {cuda} sees no GPU"
        raise HarnessError(f"--device cuda: CUDA is not available here ({why}: torch.cuda.is_available() is False)")
    return "cuda"


def check_vram_budget(spec: RunSpec, device: str) -> None:
    """`--vram-budget` sizes the device tier in VRAM: refused for a run that computes on the CPU."""
    if spec.vram_budget is not None and device != "cuda":
        raise HarnessError(
            f"--vram-budget {spec.vram_budget} sizes expert slots in GPU memory, but this run computes on the "
            f"{device} (--device {spec.device}): use --device cuda, or drop --vram-budget"
        )


def planned_kv_bytes(
    spec: RunSpec, index: PackIndex, config: Any, encoded: list[tuple[list[int], list[int] | None]]
) -> int:
    """The KV cache at the run's longest sequence (prompt and new tokens), known before any weight loads."""
    import torch

    longest = max(len(ids) for ids, _ in encoded) + spec.max_new_tokens
    return kv_cache_bytes(config, longest, getattr(torch, index.dtype).itemsize)


def workspace_bytes(spec: RunSpec, index: PackIndex, kv_bytes: int) -> int:
    """Memory a RAM budget keeps free of expert slots: the reserve, the KV cache and one read buffer per thread."""
    return WORKSPACE_RESERVE_BYTES + kv_bytes + spec.io_threads * index.stride_bytes


def plan_device_tier(
    spec: RunSpec, index: PackIndex, config: Any, encoded: list[tuple[list[int], list[int] | None]], scope: Scope
) -> DeviceTier | None:
    """The device tier `--vram-budget` allows (harness.runtime.vram), checked before any weight loads; the
    reserve holds the workspace and the KV cache at the longest sequence."""
    budget = spec.vram_budget_bytes
    if budget is None:
        return None
    kv_bytes = planned_kv_bytes(spec, index, config, encoded)
    layers, experts = len(index.moe_layers), index.num_experts
    per_layer = scope == "per-layer"
    return device_tier_slots(
        budget,
        index.dense_bytes,
        index.stride_bytes,
        index.top_k,
        groups=layers if per_layer else 1,
        reserve_bytes=DEVICE_WORKSPACE_BYTES + kv_bytes,
        maximum=experts if per_layer else experts * layers,
        budget_text=spec.vram_budget,
    )


def check_device_tier_fits(tiers: list[TierSpec] | None, device_tier: DeviceTier | None, budget: str | None) -> None:
    """`--vram-budget` bounds the stack's device tier: the tier must be named, and fit the slots the budget leaves."""
    if device_tier is None:
        return
    device = next((t for t in tiers or [] if t.kind == "device"), None)
    if device is None:
        raise HarnessError(
            f"--vram-budget {budget} bounds the device tier, but the run has none: add one to --tiers, e.g. "
            f"--tiers device:lru:{device_tier.slots},host:lru:N (at most {device_tier.slots} slots per group fit)"
        )
    if device.capacity > device_tier.slots:
        raise HarnessError(
            f"tier {device.label} holds {device.capacity} slots per eviction group, but --vram-budget {budget} "
            f"fits {device_tier.slots} ({device_tier.how})"
        )


def _disk_read_bytes(device: str | None) -> int | None:
    counters = psutil.disk_io_counters(perdisk=True) if device else None
    return counters[device].read_bytes if counters and device in counters else None


def _write_reads(records: list[IoRecord], telemetry: Telemetry, path: Path) -> None:
    """Every expert read (layer, expert, bytes, of which the page cache served, start and end) on the telemetry
    clock, for the report."""
    t0 = time.perf_counter() - telemetry.now()  # the telemetry clock's origin on perf_counter
    table = pa.table(
        {
            "layer": pa.array([r.key[0] for r in records], pa.int16()),
            "expert": pa.array([r.key[1] for r in records], pa.int16()),
            "bytes": pa.array([r.nbytes for r in records], pa.int64()),
            "page_cache_bytes": pa.array([r.page_cache_bytes for r in records], pa.int64()),
            "t_start_s": pa.array([r.start_ns / 1e9 - t0 for r in records], pa.float64()),
            "t_end_s": pa.array([r.end_ns / 1e9 - t0 for r in records], pa.float64()),
        }
    )
    pq.write_table(table, path)


@dataclass
class RunPlan:
    """Everything resolved and checked before anything heavy is loaded (no model weights, no tokenizer)."""

    spec: RunSpec
    identity: RunIdentity
    run_dir: Path
    model_dir: Path
    index: PackIndex
    config: Any
    random_init: bool
    strategy: Strategy
    scope: Scope
    device: str
    device_tier: DeviceTier | None
    """The device tier `--vram-budget` sizes; None without one."""
    prompts: list[PromptItem]
    encoded: list[tuple[list[int], list[int] | None]]
    """Token ids of each prompt and of its reference continuation (teacher-forced decoding)."""
    decode_mode: DecodeMode
    packed: dict[str, Path]
    experts_file: Path
    storage: dict[str, Any]
    enforcement: BudgetEnforcement
    disk: str | None
    tiers: list[TierSpec] | None = None
    """The expert memory tiers, top to bottom (None: one cache)."""


@dataclass
class Loaded:
    """The engine built for a plan: the model, its cache and what sizing it took."""

    engine: OffloadEngine
    cache: Any
    baseline_bytes: int
    workspace_bytes: int
    slots: int
    slots_how: str
    load_s: float


@dataclass
class Measurement:
    """What the measuring phase produced, with its trackers stopped and the engine closed."""

    loaded: Loaded
    logs: list[SequenceLog]
    wall_s: float
    device_read_bytes: int | None
    process_read_bytes: int
    budget: dict[str, int | None]
    telemetry_summary: dict[str, Any] | None
    strategy_section: dict[str, Any]
    trace_path: Path
    device_spans: list[tuple[str, float, float]] | None = None
    """CUDA runs: (copy or compute, start s, end s) of every expert on the telemetry clock."""


def check_output_dir(run_dir: Path) -> Path:
    """Prove the run folder writable and create it now, so no measurement is thrown away at the end."""
    paths.check_output_dir(run_dir, "results folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def encode_prompts(
    model_dir: Path, config: Any, prompts: list[PromptItem], max_new_tokens: int
) -> list[tuple[list[int], list[int] | None]]:
    """Tokenize the prompts (and references); refuse a tokenizer that will not load or a prompt that, with
    its new tokens, needs more positions than the model has."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # a checkpoint without a usable tokenizer
        raise HarnessError(f"{model_dir} has no usable tokenizer ({exc.__class__.__name__})") from None
    encoded = [(tokenizer.encode(p.prompt), tokenizer.encode(p.reference) if p.reference else None) for p in prompts]
    positions = getattr(config, "max_position_embeddings", None)
    for item, (ids, _) in zip(prompts, encoded, strict=True):
        if positions and len(ids) + max_new_tokens > positions:
            raise HarnessError(
                f"prompt {item.id!r} has {len(ids)} tokens; with {max_new_tokens} new tokens that is more than the "
                f"model's {positions} positions (max_position_embeddings): shorten it or lower --max-new-tokens"
            )
    return encoded


def plan_run(spec: RunSpec, results_dir: Path) -> RunPlan:
    """Resolve and check everything a run needs; raises HarnessError (bad input) before any heavy load."""
    strategy = make_strategy(spec.strategy)
    model_dir, index = preflight(spec)
    config = load_config(model_dir)
    random_init = bool(getattr(config, HARNESS_MARKER, None))
    prompts, decode_mode = select_prompts(spec, random_init)
    identity = run_identity(spec)
    scope: Scope = strategy.forced_scope or spec.scope
    encoded = encode_prompts(model_dir, config, prompts, spec.max_new_tokens)
    device_tier = plan_device_tier(spec, index, config, encoded, scope)
    strategy.check_pack(index)
    if spec.tiers is None and spec.bounds_expert_slots:
        # The budget's expert slots as far as known before any load (a RAM budget's with this process's memory
        # now, less than after the load on any device): what cannot fit the strategy is refused now.
        kv_bytes = planned_kv_bytes(spec, index, config, encoded)
        baseline = psutil.Process().memory_info().rss
        budget_slots = resolve_slots(spec, index, baseline, workspace_bytes(spec, index, kv_bytes), scope)[2]
        strategy.check_budget(index, budget_slots, kv_bytes)
    run_dir = check_output_dir(Path(results_dir) / identity.run_id)
    packed = pack_paths(model_dir)
    experts_file = place_expert_file(index, packed, spec.ssd, model_name(model_dir))
    # Each slot tier holds one step's top-k experts; a page-cache tier's reads of this file can be classified.
    tiers = None if spec.tiers is None else check_tiers(spec.tiers, index.top_k, experts_file)
    check_device_tier_fits(tiers, device_tier, spec.vram_budget)
    return RunPlan(
        spec=spec,
        identity=identity,
        run_dir=run_dir,
        model_dir=model_dir,
        index=index,
        config=config,
        random_init=random_init,
        strategy=strategy,
        scope=scope,
        device=resolve_device(spec.device),
        device_tier=device_tier,
        prompts=prompts,
        encoded=encoded,
        decode_mode=cast(DecodeMode, decode_mode),
        packed=packed,
        experts_file=experts_file,
        storage=describe_path(experts_file.parent),
        enforcement=current_enforcement(spec.ram_budget_bytes),
        disk=block_device_for_path(experts_file),
        tiers=tiers,
    )


class TelemetryTracker:
    """The telemetry sampler as a context manager: started on entry, stopped (files written) exactly once."""

    def __init__(self, plan: RunPlan) -> None:
        self.run_dir = plan.run_dir
        self.telemetry = Telemetry(plan.spec.telemetry_hz, device=plan.disk, cgroup_path=plan.enforcement.cgroup_path)
        self.summary: dict[str, Any] | None = None
        self._running = False

    def __enter__(self) -> TelemetryTracker:
        self.telemetry.start()
        self._running = True
        return self

    def stop(self) -> dict[str, Any] | None:
        if self._running:
            self._running = False
            self.summary = self.telemetry.stop(self.run_dir)
        return self.summary

    def __exit__(self, *exc: object) -> None:
        self.stop()


class IoWindow:
    """Bytes the expert file's block device and this process read between entry and exit."""

    def __init__(self, disk: str | None) -> None:
        self.disk = disk
        self.device_read_bytes: int | None = None
        self.process_read_bytes = 0

    def __enter__(self) -> IoWindow:
        self._disk_before = _disk_read_bytes(self.disk)
        self._process_before = process_io_bytes()[0]
        return self

    def __exit__(self, *exc: object) -> None:
        after = _disk_read_bytes(self.disk)
        self.process_read_bytes = process_io_bytes()[0] - self._process_before
        if self._disk_before is not None and after is not None:
            self.device_read_bytes = after - self._disk_before


class CgroupWindow:
    """The budget cgroup's counters (usage, peak, failcnt, OOM kills), read when the block ends however it ends."""

    def __init__(self, enforcement: BudgetEnforcement) -> None:
        self.enforcement = enforcement
        self.counters: dict[str, int | None] = {}

    def __enter__(self) -> CgroupWindow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.counters = budget_status(self.enforcement)


def _load(plan: RunPlan, recorder: RoutingRecorder, stack: contextlib.ExitStack) -> Loaded:
    """Build the engine (closed by `stack`), size and build the expert cache."""
    spec, index = plan.spec, plan.index
    load_start = time.perf_counter()
    engine = OffloadEngine(
        plan.model_dir,
        index,
        plan.experts_file,
        plan.packed["dense"],
        spec.io_engine,
        recorder,
        device=plan.device,
        io_depth=spec.io_depth,
    )
    stack.callback(engine.close)
    kv_bytes = planned_kv_bytes(spec, index, plan.config, plan.encoded)
    workspace = workspace_bytes(spec, index, kv_bytes)
    baseline = psutil.Process().memory_info().rss
    if plan.tiers is not None:
        cache: Any = engine.configure_tiers(plan.tiers, plan.scope, spec.seed, spec.io_threads, plan.device)
        slots, slots_how = plan.tiers[0].capacity, f"tiers {','.join(t.label for t in plan.tiers)} (top tier)"
        return Loaded(engine, cache, baseline, workspace, slots, slots_how, time.perf_counter() - load_start)
    slots, slots_how, budget_slots = resolve_slots(spec, index, baseline, workspace, plan.scope)
    request = CacheRequest(
        slots, plan.scope, spec.policy, spec.seed, spec.io_threads, spec.bounds_expert_slots, kv_bytes, budget_slots
    )
    cache = plan.strategy.build(engine, request)
    engine.use_source(cache, plan.strategy if plan.strategy.has_hooks else None)
    return Loaded(engine, cache, baseline, workspace, slots, slots_how, time.perf_counter() - load_start)


def _generate_all(
    plan: RunPlan, loaded: Loaded, telemetry: Telemetry, progress: Progress
) -> tuple[list[SequenceLog], float]:
    """Generate for every prompt; returns the sequence logs and the wall time (s)."""
    engine = loaded.engine

    def on_token(token: int) -> None:
        telemetry.event("token", seq=engine.ctx.seq_id, phase=engine.ctx.phase, step=engine.ctx.now)
        if progress.on_token:
            progress.on_token(token)

    logs: list[SequenceLog] = []
    start = time.perf_counter()
    for i, (item, (ids, ref)) in enumerate(zip(plan.prompts, plan.encoded, strict=True)):
        if progress.on_prompt:
            progress.on_prompt(i, len(plan.prompts), item)
        telemetry.event("prefill_start", seq=i, tokens=len(ids))
        new_tokens = plan.spec.max_new_tokens
        logs.append(
            generate(
                engine.model,
                ids,
                new_tokens,
                plan.decode_mode,
                ref,
                engine.ctx,
                seq_id=i,
                on_token=on_token,
                decode_threads=plan.spec.decode_threads,
            )
        )
        telemetry.event("sequence_end", seq=i)
    return logs, time.perf_counter() - start


def measure(plan: RunPlan, progress: Progress) -> Measurement:
    """Load, generate and count under the trackers; every tracker is stopped and the engine closed on any exit."""
    recorder = RoutingRecorder(
        trace_meta(str(plan.spec.model), plan.config, plan.index, f"harness run {plan.identity.run_id}")
    )
    with contextlib.ExitStack() as stack:
        cgroup = stack.enter_context(CgroupWindow(plan.enforcement))  # entered first: read after the engine closes
        tracker = stack.enter_context(TelemetryTracker(plan))
        tracker.telemetry.event("load_start")
        loaded = _load(plan, recorder, stack)
        tracker.telemetry.event("load_end", cache_slots=loaded.slots)
        timeline = DeviceTimeline(loaded.engine.device, tracker.telemetry.now) if plan.device == "cuda" else None
        loaded.engine.time_device(timeline)
        with IoWindow(plan.disk) as io:
            logs, wall_s = _generate_all(plan, loaded, tracker.telemetry, progress)
        spans = timeline.intervals() if timeline is not None else None
        loaded.engine.time_device(None)  # an unmeasured agreement pass is not timed
        plan.strategy.finish()
        tracker.stop()
        section = plan.strategy.describe()
        if not plan.strategy.exact:
            section["token_agreement"] = _token_agreement(
                loaded.engine, plan.strategy, plan.encoded, plan.spec, plan.decode_mode, logs
            )
    _write_reads(loaded.cache.stats.records, tracker.telemetry, plan.run_dir / READS_FILE)
    if spans is not None:
        write_spans(spans, plan.run_dir / DEVICE_SPANS_FILE)
    return Measurement(
        loaded=loaded,
        logs=logs,
        wall_s=wall_s,
        device_read_bytes=io.device_read_bytes,
        process_read_bytes=io.process_read_bytes,
        budget=cgroup.counters,
        telemetry_summary=tracker.summary,
        strategy_section=section,
        trace_path=recorder.writer.write(plan.run_dir / "trace.parquet"),
        device_spans=spans,
    )


def _mapped_bytes(cache: Any) -> dict[str, int] | None:
    """A strategy that maps the expert file: its device reads per phase (from /proc/self/io); else None."""
    return getattr(cache, "device_bytes_by_phase", None)


def _bytes_by_phase(m: Measurement, validity: Validity) -> dict[str, int]:
    """SSD bytes per phase: the cache's reads, plus a memory-mapped strategy's device reads."""
    bytes_by_phase = dict(m.loaded.cache.stats.bytes_by_phase)
    mapped_bytes = _mapped_bytes(m.loaded.cache)
    if mapped_bytes is not None:
        bytes_by_phase = {p: bytes_by_phase[p] + mapped_bytes[p] for p in PHASES}
        validity.note(
            "SSD bytes of memory-mapped expert reads are this process's device reads (/proc/self/io) in each "
            "phase, read-ahead included"
        )
    return bytes_by_phase


def compute_metrics(plan: RunPlan, m: Measurement, validity: Validity) -> dict[str, Any]:
    """The result's metrics section (timing notes go into `validity`)."""
    cache = m.loaded.cache
    stats = cache.stats
    tiered = isinstance(cache, TieredExperts)
    hits = _hits(cache.served() if tiered else cache.book.counts)
    trace = read_trace(m.trace_path)
    timing = timing_metrics(m.logs, plan.spec.warmup_steps, m.loaded.load_s, validity, plan.spec.min_steady_s)
    decode_s = sum(s for seq in m.logs for s in seq.step_s)
    decode_steps = timing["decode_tokens"]
    bytes_by_phase = _bytes_by_phase(m, validity)
    busy = sum(end - start for start, end in union(_read_spans(stats.records)))
    metrics = {
        **timing,
        "hits": hits,
        "hit_rate_decode": _hit_rate(hits, "decode"),
        "hit_rate_prefill": _hit_rate(hits, "prefill"),
        "ssd_read_bytes": sum(bytes_by_phase.values()),
        "ssd_read_bytes_by_phase": bytes_by_phase,
        "ssd_read_bytes_per_token": bytes_by_phase["decode"] / decode_steps if decode_steps else None,
        "expert_reads": len(stats.records),
        "expert_read_latency_s": percentiles([(r.end_ns - r.start_ns) / 1e9 for r in stats.records]),
        "expert_read_throughput_bytes_per_s": sum(r.nbytes for r in stats.records) / busy if busy else None,
        "decode_device_busy_share": _device_busy_share(
            cache, stats.records, steady_windows(m.logs, plan.spec.warmup_steps)
        ),
        "expert_wait_s_by_phase": {p: ns / 1e9 for p, ns in stats.wait_ns_by_phase.items()},
        "expert_wait_share_pct": 100 * stats.wait_ns_by_phase["decode"] / 1e9 / decode_s if decode_s else None,
        "device_read_bytes": m.device_read_bytes,
        "process_read_bytes": m.process_read_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cgroup": m.budget,
        "wall_s": m.wall_s,
        "routing": routing_stats(trace),
        "device_copy_compute": overlap_summary(m.device_spans) if m.device_spans is not None else None,
    }
    if tiered:
        metrics["tiers"] = live_tier_rows(cache, trace)
    return metrics | _io_and_floor(plan, m, metrics)


def live_tier_rows(cache: TieredExperts, trace: Trace) -> list[dict[str, Any]]:
    """`metrics.tiers`: the simulator's rows (`tier_rows`) over the run's own accesses and token rows; a
    page-cache tier's row adds the live read classification beside the model's counts."""
    tokens = {p: int(sum((s.phase == PHASE_NAMES.index(p)).sum() for s in trace.sequences)) for p in PHASES}
    stack = cache.stack
    counts = [stack.counts(i) for i in range(len(cache.tiers))]
    rows = tier_rows(cache.tiers, stack.edges(), cache.scope, counts, tokens, cache.index.expert_bytes)
    if cache.pagecache_at is not None:
        row = rows[cache.pagecache_at]
        live = AccessCounts(
            sum(c.hits for p in PHASES for c in cache.live[p].values()),
            sum(c.misses for p in PHASES for c in cache.live[p].values()),
        )
        row["live_hits"], row["live_misses"], row["live_hit_rate"] = live.hits, live.misses, live.hit_rate
        row["model_minus_live_hit_rate"] = stack.total(cache.pagecache_at).hit_rate - live.hit_rate
    return rows


def _io_and_floor(plan: RunPlan, m: Measurement, metrics: dict[str, Any]) -> dict[str, Any]:
    """The read backend and queue depth, and the decode floor (`harness.runtime.floor`) of the measured run."""
    io_info: dict[str, Any] | None = m.loaded.engine.io_info  # read backend and queue depth (None: no reads)
    settings = {
        "device": plan.device,
        "decode_mode": plan.decode_mode,
        "max_new_tokens": plan.spec.max_new_tokens,
        "warmup_steps": plan.spec.warmup_steps,
    }
    if plan.spec.decode_threads is not None:  # absent when unset: the compute cached before the setting stays valid
        settings["decode_threads"] = plan.spec.decode_threads
    return {"expert_io": io_info} | run_floor_metrics(
        metrics,
        plan.model_dir,
        plan.packed,
        plan.encoded,
        settings,
        plan.experts_file,
        plan.index.stride_bytes,
        (io_info or {}).get("queue_depth", plan.spec.io_threads),
        plan.enforcement.mode != "accounting-only",
    )


def plan_notes(plan: RunPlan, validity: Validity) -> None:
    """What the plan alone says about validity: where the expert file lives, how the budget is held."""
    if plan.storage.get("filesystem") in VOLATILE_FILESYSTEMS:
        validity.fail(
            f"the expert file is on {plan.storage['filesystem']}, which is memory, not an SSD",
            "pass --ssd with a folder on the SSD to measure",
        )
    pagecache = next((t for t in plan.tiers or [] if t.modelled), None)
    if pagecache is not None and plan.enforcement.mode == "accounting-only":
        validity.note(
            f"the page cache is not bounded by a memory cgroup ({plan.enforcement.reason}): the live page-cache "
            f"tier holds what the kernel keeps, the model {pagecache.capacity} experts"
        )
    elif plan.spec.ram_budget_bytes is not None and plan.enforcement.mode == "accounting-only":
        validity.note(
            f"RAM budget not enforced by a cgroup ({plan.enforcement.reason}): accounting only, "
            "expert reads bypass the page cache"
        )


def assess(plan: RunPlan, m: Measurement, metrics: dict[str, Any], validity: Validity) -> None:
    """The validity verdict on what was measured: how reads went, whether the device saw them."""
    reader = m.loaded.engine.reader
    if reader.engine == "buffered-pagecache":
        validity.note(
            "a page-cache tier: expert reads are buffered through the page cache, each classified page cache or "
            "device (RWF_NOWAIT); SSD bytes count the device's part, the tier's hits/misses are the simulator's "
            "LRU model and live_hits/live_misses the classification"
        )
    elif reader.engine != "direct":
        validity.note(f"expert reads are buffered with the file dropped from the page cache: {reader.fallback_reason}")
    huge_note = base_page_note(m.loaded.cache.pool.huge_page_share, "the expert slot memory")
    if reader.engine == "direct" and huge_note:
        validity.note(huge_note)
    if m.budget.get("failcnt"):
        validity.note(
            f"the memory cgroup hit its limit {m.budget['failcnt']} times: the kernel reclaimed memory "
            "under the budget (page cache first)"
        )
    counted = metrics["ssd_read_bytes"]
    if m.process_read_bytes < 0.95 * counted:
        validity.fail(
            f"this process made the device read {m.process_read_bytes} bytes but the harness counted "
            f"{counted}: some expert reads did not reach the device",
            "check that the expert file is not served from a cache",
        )
    if (metrics.get("decode_floor") or {}).get("compute_under_load"):
        validity.note(
            f"the floor's compute time was {metrics['decode_floor']['compute_source']}; decode_floor_ratio reads low"
        )
    shadow = m.strategy_section.get("stats", {})
    if shadow.get("shadow_and_staging_within_budget") is False:
        validity.fail(
            f"the shadow model ({shadow['shadow_bytes']} bytes: weights and its KV cache) and the staging slots "
            f"({shadow['staging_bytes']} bytes) exceed the {shadow['budget_expert_bytes']} bytes the budget "
            "leaves for experts",
            "use a larger budget, the int8 shadow, or another predictor",
        )
    if plan.random_init:
        validity.note(
            "random-init model: routing made realistic by sharpened attention (ROUTING.md), "
            "not a trained model's routing"
        )


def _resolved(plan: RunPlan, m: Measurement) -> dict[str, Any]:
    """The result's `resolved` section: what the spec turned into on this machine."""
    index, loaded, spec = plan.index, m.loaded, plan.spec
    book = loaded.cache.book
    policy_desc = book.policies[0].describe()
    tiers = {} if plan.tiers is None else {"tiers": [t.label for t in plan.tiers], "tier_semantics": SEMANTICS}
    return tiers | {
        "architecture": plan.config.model_type,
        "model_dir": str(plan.model_dir),
        "model_name": model_name(plan.model_dir),
        "random_init": plan.random_init,
        "decode_mode": plan.decode_mode,
        "scope": plan.scope,
        "policy": plan.tiers[0].policy
        if plan.tiers
        else spec.policy
        if plan.strategy.uses_spec_policy
        else policy_desc["name"],
        "policy_params": policy_desc,
        "strategy": plan.strategy.name,
        "cache_slots": loaded.slots,
        "cache_slots_total": book.total_slots,
        "cache_slots_how": loaded.slots_how,
        "cache_bytes": loaded.cache.slot_bytes,
        "cache_fraction": book.total_slots / (index.num_experts * len(index.moe_layers)),
        "expert_bytes": index.expert_bytes,
        "expert_dtype": index.expert_dtype,
        "bits_per_weight": index.bits_per_weight,
        "expert_stride_bytes": index.stride_bytes,
        "num_experts": index.num_experts,
        "top_k": index.top_k,
        "moe_layers": index.moe_layers,
        "dense_bytes": index.dense_bytes,
        "total_expert_bytes": index.total_expert_bytes,
        "baseline_rss_bytes": loaded.baseline_bytes,
        "workspace_bytes": loaded.workspace_bytes,
        "io_engine": loaded.engine.reader.engine,
        "io_buffer_huge_page_share": loaded.cache.pool.huge_page_share,
        "io_threads": spec.io_threads,
        "budget_enforcement": plan.enforcement.mode,
        "budget": plan.enforcement.to_dict(),
        "ram_budget_bytes": spec.ram_budget_bytes,
        "ssd_path": spec.ssd,
        "expert_file": str(plan.experts_file),
        "device": plan.device,
        "vram_budget_bytes": spec.vram_budget_bytes,
        "device_tier": plan.device_tier.to_dict() if plan.device_tier is not None else None,
        "prompts": len(plan.prompts),
    }


def build_result(plan: RunPlan, m: Measurement, metrics: dict[str, Any], validity: Validity) -> RunResult:
    """The typed result of a measured run (status ok)."""
    return RunResult.envelope(
        plan.spec,
        plan.identity,
        resolved=_resolved(plan, m),
        metrics=metrics,
        strategy=m.strategy_section,
        generated=[
            {"prompt_index": i, "id": item.id, "token_ids": seq.token_ids}
            for i, (item, seq) in enumerate(zip(plan.prompts, m.logs, strict=True))
        ],
        environment=environment(),
        storage=plan.storage,
        hardware_profile=str(profile_for_path(plan.experts_file) or "") or None,
        telemetry=m.telemetry_summary,
        validity=validity.to_dict(),
        files={"trace": "trace.parquet", "timeline": TIMELINE_FILE, "events": EVENTS_FILE, "reads": READS_FILE}
        | ({"device_spans": DEVICE_SPANS_FILE} if m.device_spans is not None else {}),
    )


def run_planned(plan: RunPlan, progress: Progress) -> RunResult:
    """measure -> assess -> typed result, for a plan."""
    measurement = measure(plan, progress)
    validity = Validity()
    plan_notes(plan, validity)
    metrics = compute_metrics(plan, measurement, validity)
    assess(plan, measurement, metrics, validity)
    return build_result(plan, measurement, metrics, validity)


def refuse_existing(run_dir: Path, inherited: bool, replace: bool) -> None:
    """A run that already has a result is not silently replaced: refused unless `replace`, or unless a parent
    that claimed the folder (a sweep) decided to run it."""
    if not (replace or inherited) and (run_dir / RESULT_FILE).is_file():
        raise HarnessError(
            f"run {run_dir.name} already has a result in {run_dir.parent}; use --repeat N for another "
            "measurement, or --force to replace it"
        )


def _guarded(
    spec: RunSpec, identity: RunIdentity, run_dir: Path, work: Callable[[], RunResult], replace: bool
) -> RunResult:
    """Run `work` holding the run folder; anything but an interrupt becomes a written failed result."""
    with claim_run_dir(run_dir) as inherited:
        refuse_existing(run_dir, inherited, replace)
        try:
            result = work()
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            log.debug("run %s failed", identity.run_id, exc_info=True)
            result = failure_result(spec, identity, exc)
        try:
            result.save(run_dir)
        except OSError as exc:
            raise HarnessError(f"cannot write the result of run {identity.run_id} to {run_dir}: {exc}") from None
    return result


def run_cell(spec: RunSpec, results_dir: Path, progress: Progress | None = None, *, replace: bool = True) -> RunResult:
    """One cell, start to finish: plan (HarnessError = bad input, nothing written), then measure under the run
    folder's lock; a failure while measuring is written as a failed result and returned. Peers are chosen here.
    With `replace` off, a run that already has a result is refused."""
    progress = progress or Progress()
    if split_spec(spec.strategy)[0] in PEERS:
        from harness.peers import run_peer

        model_dir = resolve_model_dir(spec.model)
        identity = run_identity(spec)
        run_dir = check_output_dir(Path(results_dir) / identity.run_id)
        return _guarded(spec, identity, run_dir, lambda: run_peer(spec, identity, run_dir, model_dir), replace)
    plan = plan_run(spec, Path(results_dir))
    return _guarded(spec, plan.identity, plan.run_dir, lambda: run_planned(plan, progress), replace)


def execute(spec: RunSpec, results_dir: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Run one cell and write its result folder; returns the result as written (see `run_cell`)."""
    return run_cell(spec, results_dir, progress).to_dict()


def _token_agreement(
    engine: OffloadEngine,
    strategy: Strategy,
    encoded: list[tuple[list[int], list[int] | None]],
    spec: RunSpec,
    decode_mode: DecodeMode,
    logs: list[SequenceLog],
) -> dict[str, Any]:
    """Share of positions where an approximate strategy's tokens equal the exact model's.

    The exact tokens come from a second, unmeasured pass over the same prompts in the same cell, with the
    strategy's approximation switched off (same engine, same decoding mode and teacher-forcing inputs).
    The measured run's counters are restored afterwards and the routing recorder is detached meanwhile.
    """
    cache = engine.cache
    saved = cache.snapshot()  # type: ignore[union-attr]
    sinks = [m.sink for m in engine.modules]
    for module in engine.modules:
        module.sink = None
    strategy.approximate = False
    same = total = 0
    try:
        for i, ((ids, ref), measured) in enumerate(zip(encoded, logs, strict=True)):
            exact = generate(
                engine.model,
                ids,
                spec.max_new_tokens,
                decode_mode,
                ref,
                engine.ctx,
                seq_id=i,
                decode_threads=spec.decode_threads,
            )
            same += sum(a == b for a, b in zip(exact.token_ids, measured.token_ids, strict=True))
            total += len(exact.token_ids)
    finally:
        strategy.approximate = True
        cache.restore(saved)  # type: ignore[union-attr]
        for module, sink in zip(engine.modules, sinks, strict=True):
            module.sink = sink
    return {
        "agreement": same / total if total else None,
        "positions": total,
        "reference": f"exact model ({decode_mode}) in the same cell: a second, unmeasured pass with the "
        "approximation switched off",
    }


def failure_result(spec: RunSpec, identity: RunIdentity, error: BaseException) -> RunResult:
    """A failed run's result; the reason is the error's one-line message (a traceback for anything else)."""
    reason = str(error) if isinstance(error, HarnessError) else f"{error.__class__.__name__}: {error}"
    is_bug = not isinstance(error, HarnessError)
    return RunResult.envelope(
        spec,
        identity,
        "failed",
        reason,
        traceback="".join(traceback.format_exception(error, limit=20)) if is_bug else None,
        environment=environment(),
    )


def write_failure(spec: RunSpec, results_dir: Path, error: BaseException) -> Path:
    """Record a failed cell (the sweep goes on)."""
    identity = run_identity(spec)
    return failure_result(spec, identity, error).save(Path(results_dir) / identity.run_id)
