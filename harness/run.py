"""One measurement: resolve the spec, place the expert file, size the cache, generate, write the result.

Writes `<results>/<run_id>/result.json` (schema-versioned, atomic), `trace.parquet` and, when the
telemetry sampler runs, `timeline.parquet`. Knows nothing of policies or model internals beyond the
engine's interface.
"""

from __future__ import annotations

import logging
import math
import resource
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from harness.budget import BudgetEnforcement, budget_status, detect_hierarchy, effective_limit
from harness.cache.book import ExpertCacheBook
from harness.errors import HarnessError
from harness.iomem import base_page_note
from harness.keys import PHASES
from harness.models.adapters import load_config
from harness.models.factory import HARNESS_MARKER
from harness.models.packer import pack_model, pack_paths, verify_pack
from harness.results import Validity, environment, result_envelope, write_json_atomic
from harness.runtime.engine import OffloadEngine, check_live_policy
from harness.runtime.generation import SequenceLog, generate
from harness.runtime.strategies import PEERS, CacheRequest, Strategy, check_strategy, make_strategy
from harness.runtime.strategies.base import split_spec
from harness.runtime.timing import percentiles, timing_metrics
from harness.spec import RunSpec
from harness.ssd.devices import block_device_for_path, describe_path
from harness.ssd.readtime import load_profile_for_path, profile_for_path
from harness.store.layout import INDEX_FILE, PackIndex
from harness.store.reader import IoRecord
from harness.telemetry.probes import process_io_bytes
from harness.telemetry.recorder import EVENTS_FILE, TIMELINE_FILE, Telemetry
from harness.trace.recorder import RoutingRecorder, trace_meta
from harness.trace.schema import read_trace
from harness.trace.stats import routing_stats
from harness.workloads import PromptItem, select_prompts

log = logging.getLogger(__name__)

WORKSPACE_RESERVE_BYTES = 256 << 20
"""Memory kept free of expert slots for activations, allocator slack and the Python heap (bytes).
A documented default; the run records it and the measured peak RSS so it can be checked."""
READS_FILE = "expert_reads.parquet"
VOLATILE_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs"})
"""Filesystems in memory: an expert file there measures RAM, not an SSD."""


@dataclass
class Progress:
    """Callbacks the CLI uses to show tokens as they come; all optional."""

    on_prompt: Callable[[int, int, PromptItem], None] | None = None
    on_token: Callable[[int], None] | None = None


def resolve_model_dir(model: str) -> Path:
    path = Path(model).expanduser()
    if path.exists():
        return path
    if model.count("/") == 1 and not model.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(model, local_files_only=True))
        except Exception:  # any failure means: not in the local cache
            raise HarnessError(
                f"model {model!r} is neither a folder nor in the local Hugging Face cache "
                "(nothing is downloaded at run time)"
            ) from None
    raise HarnessError(f"model folder {model} does not exist")


def place_expert_file(index: PackIndex, packed: dict[str, Path], ssd: str | None, model_name: str) -> Path:
    """The expert file to read: the pack itself, or a verified copy inside the `ssd` folder."""
    if ssd is None:
        return packed["experts"]
    root = Path(ssd).expanduser()
    if not root.is_dir():
        raise HarnessError(f"SSD path {root} does not exist or is not a folder")
    tag = f"{sum(e.crc32 for e in index.entries) & 0xFFFFFFFF:08x}"
    dest_dir = root / "harness-experts" / f"{model_name}-{tag}"
    dest = dest_dir / "experts.bin"
    if dest.exists() and dest.stat().st_size == packed["experts"].stat().st_size:
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    log.info("copying the expert file to %s", dest)
    partial = dest.with_name("experts.bin.partial")
    shutil.copyfile(packed["experts"], partial)
    verify_pack(partial, index)
    partial.replace(dest)
    shutil.copyfile(packed["index"], dest_dir / INDEX_FILE)
    return dest


def kv_cache_bytes(config: Any, tokens: int, dtype_bytes: int) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * tokens * dtype_bytes


def resolve_slots(
    spec: RunSpec, index: PackIndex, baseline_bytes: int, workspace_bytes: int, scope: str | None = None
) -> tuple[int, str]:
    """Cache capacity in slots per eviction group (of `scope`, default the spec's), and how it was derived."""
    scope = scope or spec.scope
    layers, experts, k = len(index.moe_layers), index.num_experts, index.top_k
    groups = layers if scope == "per-layer" else 1
    maximum = experts if scope == "per-layer" else experts * layers
    if spec.cache_experts is not None:
        text = spec.cache_experts.strip()
        try:
            slots = round(float(text[:-1]) / 100 * maximum) if text.endswith("%") else int(text)
        except ValueError:
            raise HarnessError(f"cache_experts must be a count or a share, e.g. 16 or 25% (got {text!r})") from None
        how = f"cache_experts={text}"
    elif spec.ram_budget_bytes is not None:
        free = spec.ram_budget_bytes - baseline_bytes - workspace_bytes
        slots = max(free, 0) // (index.stride_bytes * groups)
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
    return min(slots, maximum), how


def _busy_seconds(records: list[IoRecord]) -> float:
    """Length of the union of the read intervals: the time the SSD had at least one expert read in flight."""
    total, end = 0, -1
    for rec in sorted(records, key=lambda r: r.start_ns):
        if rec.start_ns > end:
            total += rec.end_ns - rec.start_ns
            end = rec.end_ns
        elif rec.end_ns > end:
            total += rec.end_ns - end
            end = rec.end_ns
    return total / 1e9


def _hits(book: ExpertCacheBook) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for phase in PHASES:
        per_layer = {str(layer): [c.hits, c.misses] for layer, c in book.counts[phase].items()}
        total = book.total(phase)
        out[phase] = {"hits": total.hits, "misses": total.misses, "per_layer": per_layer}
    return out


def current_enforcement(limit_bytes: int | None) -> BudgetEnforcement:
    """How this process is held to `limit_bytes` now, without moving it: a cgroup limit at least as tight
    (within one 4 KiB page) is enforcement; anything else is accounting only."""
    if limit_bytes is None:
        return BudgetEnforcement("accounting-only", None, None, "no RAM budget given")
    hier = detect_hierarchy()
    current, where = effective_limit(hier) if hier else (None, None)
    if hier is not None and current is not None and current <= limit_bytes + 4096:
        return BudgetEnforcement(hier.mode, current, str(where), f"running under {hier.limit_file}={current}")
    return BudgetEnforcement("accounting-only", None, None, "not running inside a memory cgroup with the budget")


def preflight(spec: RunSpec) -> tuple[Path, PackIndex]:
    """Checks that need no model load: the model resolves and packs, the policy runs live, and the budget
    can hold this process (interpreter and libraries as measured now), the non-expert weights, the
    workspace and one layer's top-k experts."""
    resolve_device(spec.device)
    check_live_policy(spec.policy)
    check_strategy(spec.strategy)
    model_dir = resolve_model_dir(spec.model)
    load_config(model_dir)  # refuses an unsupported architecture with the reason
    index, _ = pack_model(model_dir)
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
    return model_dir, index


def resolve_device(requested: str) -> str:
    """Where compute runs: the CPU path is complete; the GPU tier (issue 7) is not built yet."""
    import torch

    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise HarnessError("--device cuda: CUDA is not available here (torch.cuda.is_available() is False)")
    raise HarnessError("--device cuda: the GPU tier is not implemented yet; use --device cpu")


def _time_model(
    experts_file: Path, decode_bytes: int, decode_steps: int, index: PackIndex, spec: RunSpec
) -> dict[str, Any] | None:
    """What the SSD profile of this disk predicts for the decode reads: the I/O floor per token (s)."""
    model = load_profile_for_path(experts_file)
    if model is None or not decode_steps:
        return None
    per_token = decode_bytes / decode_steps
    return {
        "profile": model.source,
        "decode_read_s_per_token": model.seconds(int(per_token), spec.io_threads, index.stride_bytes),
    }


def _disk_read_bytes(device: str | None) -> int | None:
    counters = psutil.disk_io_counters(perdisk=True) if device else None
    return counters[device].read_bytes if counters and device in counters else None


def _write_reads(records: list[IoRecord], telemetry: Telemetry, path: Path) -> None:
    """Every expert read (layer, expert, bytes, start and end) on the telemetry clock, for the report."""
    t0 = time.perf_counter() - telemetry.now()  # the telemetry clock's origin on perf_counter
    table = pa.table(
        {
            "layer": pa.array([r.key[0] for r in records], pa.int16()),
            "expert": pa.array([r.key[1] for r in records], pa.int16()),
            "bytes": pa.array([r.nbytes for r in records], pa.int64()),
            "t_start_s": pa.array([r.start_ns / 1e9 - t0 for r in records], pa.float64()),
            "t_end_s": pa.array([r.end_ns / 1e9 - t0 for r in records], pa.float64()),
        }
    )
    pq.write_table(table, path)


def execute(spec: RunSpec, results_dir: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Run one cell and write its result folder; returns the result dict (status ok)."""
    progress = progress or Progress()
    run_dir = Path(results_dir) / spec.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    if split_spec(spec.strategy)[0] in PEERS:
        from harness.peers import run_peer

        return run_peer(spec, run_dir)
    strategy = make_strategy(spec.strategy)
    scope = strategy.forced_scope or spec.scope
    model_dir, index = preflight(spec)
    device = resolve_device(spec.device)
    config = load_config(model_dir)
    random_init = bool(getattr(config, HARNESS_MARKER, None))
    prompts, decode_mode = select_prompts(spec, random_init)
    packed = pack_paths(model_dir)
    experts_file = place_expert_file(index, packed, spec.ssd, model_dir.name)

    validity = Validity()
    storage = describe_path(experts_file.parent)
    if storage.get("filesystem") in VOLATILE_FILESYSTEMS:
        validity.fail(
            f"the expert file is on {storage['filesystem']}, which is memory, not an SSD",
            "pass --ssd with a folder on the SSD to measure",
        )
    enforcement = current_enforcement(spec.ram_budget_bytes)
    if spec.ram_budget_bytes is not None and enforcement.mode == "accounting-only":
        validity.note(
            f"RAM budget not enforced by a cgroup ({enforcement.reason}): accounting only, "
            "expert reads bypass the page cache"
        )
    disk = block_device_for_path(experts_file)
    telemetry = Telemetry(spec.telemetry_hz, device=disk, cgroup_path=enforcement.cgroup_path).start()
    telemetry.event("load_start")

    recorder = RoutingRecorder(trace_meta(str(spec.model), config, index, f"harness run {spec.run_id}"))
    load_start = time.perf_counter()
    engine = OffloadEngine(model_dir, index, experts_file, packed["dense"], spec.io_engine, recorder)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # a checkpoint without a usable tokenizer
        engine.close()
        raise HarnessError(f"{model_dir} has no usable tokenizer ({exc.__class__.__name__})") from None
    encoded = [(tokenizer.encode(p.prompt), tokenizer.encode(p.reference) if p.reference else None) for p in prompts]
    longest = max(len(ids) for ids, _ in encoded) + spec.max_new_tokens
    dtype_bytes = engine.model.dtype.itemsize
    workspace = (
        WORKSPACE_RESERVE_BYTES
        + kv_cache_bytes(engine.config, longest, dtype_bytes)
        + spec.io_threads * index.stride_bytes
    )
    baseline = psutil.Process().memory_info().rss
    slots, slots_how = resolve_slots(spec, index, baseline, workspace, scope)
    cache = strategy.build(engine, CacheRequest(slots, scope, spec.policy, spec.seed, spec.io_threads))
    engine.use_source(cache, strategy if strategy.has_hooks else None)
    load_s = time.perf_counter() - load_start
    telemetry.event("load_end", cache_slots=slots)

    def on_token(token: int) -> None:
        telemetry.event("token", seq=engine.ctx.seq_id, phase=engine.ctx.phase, step=engine.ctx.now)
        if progress.on_token:
            progress.on_token(token)

    logs: list[SequenceLog] = []
    disk_before = _disk_read_bytes(disk)
    process_before = process_io_bytes()[0]
    run_start = time.perf_counter()
    telemetry_summary = None
    try:
        for i, (item, (ids, ref)) in enumerate(zip(prompts, encoded, strict=True)):
            if progress.on_prompt:
                progress.on_prompt(i, len(prompts), item)
            telemetry.event("prefill_start", seq=i, tokens=len(ids))
            log_i = generate(
                engine.model, ids, spec.max_new_tokens, decode_mode, ref, engine.ctx, seq_id=i, on_token=on_token
            )
            logs.append(log_i)
            telemetry.event("sequence_end", seq=i)
        wall_s = time.perf_counter() - run_start
        disk_after = _disk_read_bytes(disk)
        process_read = process_io_bytes()[0] - process_before
        strategy.finish()
        telemetry_summary = telemetry.stop(run_dir)
        strategy_section = strategy.describe()
        if not strategy.exact:
            strategy_section["token_agreement"] = _token_agreement(engine, strategy, encoded, spec, decode_mode, logs)
    finally:
        if telemetry_summary is None:
            telemetry.stop(run_dir)
        engine.close()
    disk_read = None if disk_before is None or disk_after is None else disk_after - disk_before
    budget = budget_status(enforcement)
    _write_reads(cache.stats.records, telemetry, run_dir / READS_FILE)

    trace_path = recorder.writer.write(run_dir / "trace.parquet")
    stats = cache.stats
    book = cache.book
    timing = timing_metrics(logs, spec.warmup_steps, load_s, validity)
    decode_s = sum(s for seq in logs for s in seq.step_s)
    decode_steps = timing["decode_tokens"]
    read_lat = [(r.end_ns - r.start_ns) / 1e9 for r in stats.records]
    read_bytes = sum(r.nbytes for r in stats.records)
    bytes_by_phase = dict(stats.bytes_by_phase)
    # Strategies that read experts through a memory map: their SSD bytes are the block device's counts.
    mapped_bytes = getattr(cache, "device_bytes_by_phase", None)
    if mapped_bytes is not None:
        bytes_by_phase = {p: bytes_by_phase[p] + mapped_bytes[p] for p in PHASES}
        validity.note(
            "SSD bytes of memory-mapped expert reads are this process's device reads (/proc/self/io) in each "
            "phase, read-ahead included"
        )
    busy = _busy_seconds(stats.records)
    decode_hits = book.total("decode")
    prefill_hits = book.total("prefill")
    if engine.reader.engine != "direct":
        validity.note(
            f"expert reads are buffered with the file dropped from the page cache: {engine.reader.fallback_reason}"
        )
    huge_note = base_page_note(cache.pool.huge_page_share, "the expert slot memory")
    if engine.reader.engine == "direct" and huge_note:
        validity.note(huge_note)
    if budget.get("failcnt"):
        validity.note(
            f"the memory cgroup hit its limit {budget['failcnt']} times: the kernel reclaimed memory "
            "under the budget (page cache first)"
        )
    if process_read < 0.95 * sum(bytes_by_phase.values()):
        validity.fail(
            f"this process made the device read {process_read} bytes but the harness counted "
            f"{sum(bytes_by_phase.values())}: some expert reads did not reach the device",
            "check that the expert file is not served from a cache",
        )
    if random_init:
        validity.note(
            "random-init model: routing made realistic by sharpened attention (ROUTING.md), "
            "not a trained model's routing"
        )
    routing = routing_stats(read_trace(trace_path))
    metrics = {
        **timing,
        "hits": _hits(book),
        "hit_rate_decode": decode_hits.hit_rate,
        "hit_rate_prefill": prefill_hits.hit_rate,
        "ssd_read_bytes": sum(bytes_by_phase.values()),
        "ssd_read_bytes_by_phase": bytes_by_phase,
        "ssd_read_bytes_per_token": bytes_by_phase["decode"] / decode_steps if decode_steps else None,
        "expert_reads": len(stats.records),
        "expert_read_latency_s": percentiles(read_lat),
        "expert_read_throughput_bytes_per_s": read_bytes / busy if busy else None,
        "expert_wait_s_by_phase": {p: ns / 1e9 for p, ns in stats.wait_ns_by_phase.items()},
        "expert_wait_share_pct": 100 * stats.wait_ns_by_phase["decode"] / 1e9 / decode_s if decode_s else None,
        "device_read_bytes": disk_read,
        "process_read_bytes": process_read,
        "ssd_time_model": _time_model(experts_file, bytes_by_phase["decode"], decode_steps, index, spec),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cgroup": budget,
        "wall_s": wall_s,
        "routing": routing,
    }
    policy_desc = book.policies[0].describe()
    result = {
        **result_envelope(spec),
        "resolved": {
            "architecture": config.model_type,
            "model_dir": str(model_dir),
            "model_name": model_dir.name,
            "random_init": random_init,
            "decode_mode": decode_mode,
            "scope": scope,
            "policy": spec.policy if strategy.uses_spec_policy else policy_desc["name"],
            "policy_params": policy_desc,
            "strategy": strategy.name,
            "cache_slots": slots,
            "cache_slots_total": book.total_slots,
            "cache_slots_how": slots_how,
            "cache_bytes": cache.slot_bytes,
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
            "baseline_rss_bytes": baseline,
            "workspace_bytes": workspace,
            "io_engine": engine.reader.engine,
            "io_buffer_huge_page_share": cache.pool.huge_page_share,
            "io_threads": spec.io_threads,
            "budget_enforcement": enforcement.mode,
            "budget": enforcement.to_dict(),
            "ram_budget_bytes": spec.ram_budget_bytes,
            "ssd_path": spec.ssd,
            "expert_file": str(experts_file),
            "device": device,
            "prompts": len(prompts),
        },
        "metrics": metrics,
        "strategy": strategy_section,
        "generated": [
            {"prompt_index": i, "id": item.id, "token_ids": seq.token_ids}
            for i, (item, seq) in enumerate(zip(prompts, logs, strict=True))
        ],
        "environment": environment(),
        "storage": storage,
        "hardware_profile": str(profile_for_path(experts_file) or "") or None,
        "telemetry": telemetry_summary,
        "validity": validity.to_dict(),
        "files": {"trace": "trace.parquet", "timeline": TIMELINE_FILE, "events": EVENTS_FILE, "reads": READS_FILE},
    }
    write_json_atomic(run_dir / "result.json", result)
    return result


def _token_agreement(
    engine: OffloadEngine,
    strategy: Strategy,
    encoded: list[tuple[list[int], list[int] | None]],
    spec: RunSpec,
    decode_mode: str,
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
            exact = generate(engine.model, ids, spec.max_new_tokens, decode_mode, ref, engine.ctx, seq_id=i)
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


def write_failure(spec: RunSpec, results_dir: Path, error: BaseException) -> Path:
    """Record a failed cell (the sweep goes on); the reason is the error's one-line message."""
    run_dir = Path(results_dir) / spec.run_id
    reason = str(error) if isinstance(error, HarnessError) else f"{error.__class__.__name__}: {error}"
    return write_json_atomic(
        run_dir / "result.json",
        {
            **result_envelope(spec, "failed", reason),
            "traceback": None if isinstance(error, HarnessError) else traceback.format_exc(limit=20),
            "environment": environment(),
        },
    )
