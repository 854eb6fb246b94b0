"""What every peer run shares: the prompts, the timed decode loop's bookkeeping, device read counters per
phase, and a result.json in the offload engine's shape (fields a peer cannot measure are null, with a note).
A peer whose package is not installed writes status "skipped" with the reason."""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.budget import budget_status
from harness.models.adapters import load_config
from harness.models.factory import HARNESS_MARKER
from harness.results import RESULT_SCHEMA_VERSION, Validity, environment, write_json_atomic
from harness.spec import RunSpec
from harness.ssd.devices import describe_path
from harness.telemetry.phase_io import PhaseReadBytes
from harness.workloads import PromptItem, load_workload

log = logging.getLogger(__name__)


class PeerUnavailable(Exception):
    """The peer cannot run on this machine (package missing, converter missing): the cell is skipped."""


@dataclass
class PeerSequence:
    prompt_tokens: int
    prefill_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)


def workload(spec: RunSpec, model_dir: Path) -> tuple[list[PromptItem], str]:
    prompts = [PromptItem("prompt", spec.prompt)] if spec.prompt else load_workload(spec.workload or "default")
    prompts = prompts[: spec.max_prompts] if spec.max_prompts else prompts
    random_init = bool(getattr(load_config(model_dir), HARNESS_MARKER, None))
    mode = spec.decode or ("teacher-forced" if random_init else "greedy")
    return prompts, mode


def decode_loop(
    step: Callable[[list[int], bool], int],
    prompt_ids: list[int],
    max_new_tokens: int,
    mode: str,
    reference_ids: list[int] | None,
    phases: PhaseReadBytes,
) -> PeerSequence:
    """The harness's loop for a peer: `step(ids, first)` feeds tokens and returns the argmax next token."""
    seq = PeerSequence(len(prompt_ids))
    if mode == "teacher-forced":
        max_new_tokens = min(max_new_tokens, len(reference_ids or []) + 1)
    phases.mark("prefill")
    start = time.perf_counter()
    token = step(prompt_ids, True)
    seq.prefill_s = time.perf_counter() - start
    seq.token_ids.append(token)
    phases.mark("decode")
    for i in range(max_new_tokens - 1):
        feed = token if mode == "greedy" else reference_ids[i]  # type: ignore[index]
        start = time.perf_counter()
        token = step([feed], False)
        seq.step_s.append(time.perf_counter() - start)
        seq.token_ids.append(token)
    phases.mark(None)
    return seq


def _pct(values: list[float]) -> dict[str, float | None]:
    import numpy as np

    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    arr = np.asarray(values)
    return {f"p{q}": float(np.percentile(arr, q)) for q in (50, 90, 99)} | {"mean": float(arr.mean())}


def peer_result(
    spec: RunSpec,
    model_dir: Path,
    name: str,
    seqs: list[PeerSequence],
    phases: PhaseReadBytes,
    section: dict[str, Any],
    resolved: dict[str, Any],
    validity: Validity,
    load_s: float,
    mode: str,
) -> dict[str, Any]:
    from harness.run import MIN_STEADY_DECODE_STEPS, current_enforcement

    steady = [s for seq in seqs for s in seq.step_s[spec.warmup_steps :]]
    decode_steps = sum(len(seq.step_s) for seq in seqs)
    prefill_s = sum(s.prefill_s for s in seqs)
    if len(steady) < MIN_STEADY_DECODE_STEPS:
        validity.fail(f"only {len(steady)} steady-state decode steps (< {MIN_STEADY_DECODE_STEPS})", "raise tokens")
    enforcement = current_enforcement(spec.ram_budget_bytes)
    known = True  # /proc/self/io is always there on Linux
    validity.note(
        f"{name}: no expert cache of its own, so hit rate is null; SSD bytes are the device reads this process "
        "caused (/proc/self/io: page-cache misses and read-ahead through its memory map)"
    )
    metrics = {
        "prefill_tokens": sum(s.prompt_tokens for s in seqs),
        "prefill_tokens_per_s": sum(s.prompt_tokens for s in seqs) / prefill_s if prefill_s else None,
        "decode_tokens": decode_steps,
        "decode_steady_tokens": len(steady),
        "decode_tokens_per_s": len(steady) / sum(steady) if steady else None,
        "ttft_s": _pct([s.prefill_s for s in seqs]),
        "cold_start": {"load_s": load_s, "first_ttft_s": seqs[0].prefill_s if seqs else None},
        "token_latency_s": _pct(steady),
        "hits": None,
        "hit_rate_decode": None,
        "hit_rate_prefill": None,
        "ssd_read_bytes": sum(phases.by_phase.values()) if known else None,
        "ssd_read_bytes_by_phase": dict(phases.by_phase) if known else None,
        "ssd_read_bytes_per_token": phases.by_phase["decode"] / decode_steps if known and decode_steps else None,
        "device_read_bytes": sum(phases.by_phase.values()) if known else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cgroup": budget_status(enforcement),
    }
    return {
        "schema_version": RESULT_SCHEMA_VERSION,
        "run_id": spec.run_id,
        "status": "ok",
        "error": None,
        "spec": spec.canonical(),
        "resolved": {
            "model_dir": str(model_dir),
            "model_name": model_dir.name,
            "decode_mode": mode,
            "strategy": name,
            "policy": None,
            "scope": None,
            "ram_budget_bytes": spec.ram_budget_bytes,
            "budget_enforcement": enforcement.mode,
            "budget": enforcement.to_dict(),
            "device": "cpu",
            "prompts": len(seqs),
            **resolved,
        },
        "metrics": metrics,
        "strategy": section,
        "generated": [{"prompt_index": i, "token_ids": s.token_ids} for i, s in enumerate(seqs)],
        "environment": environment(),
        "storage": describe_path(model_dir),
        "hardware_profile": None,
        "validity": validity.to_dict(),
    }


def run_peer(spec: RunSpec, run_dir: Path) -> dict[str, Any]:
    """Run the peer named by `spec.strategy`; write and return its result (status ok or skipped)."""
    from harness.peers import accelerate_peer, llamacpp
    from harness.run import resolve_model_dir
    from harness.runtime.strategies.base import split_spec

    name, argument = split_spec(spec.strategy)
    runner = {"accelerate": accelerate_peer.run, "llama.cpp": llamacpp.run}[name]
    model_dir = resolve_model_dir(spec.model)
    phases = PhaseReadBytes()
    try:
        result = runner(spec, model_dir, run_dir, argument, phases)
    except PeerUnavailable as exc:
        log.warning("peer %s skipped: %s", name, exc)
        result = {
            "schema_version": RESULT_SCHEMA_VERSION,
            "run_id": spec.run_id,
            "status": "skipped",
            "error": f"peer {name} skipped: {exc}",
            "spec": spec.canonical(),
            "environment": environment(),
        }
    write_json_atomic(run_dir / "result.json", result)
    return result
