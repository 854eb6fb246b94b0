"""What every peer run shares: the prompts, the timed decode loop's bookkeeping, device read counters per
phase, and a result.json in the offload engine's shape (fields a peer cannot measure are null, with a note).
A peer whose package is not installed writes status "skipped" with the reason."""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.budget import budget_status, current_enforcement
from harness.identity import RunIdentity
from harness.models.adapters import load_config
from harness.models.factory import HARNESS_MARKER
from harness.models.locate import model_name
from harness.result_model import RunResult
from harness.results import Validity, environment
from harness.runtime.generation import SequenceLog
from harness.runtime.timing import timing_metrics
from harness.spec import RunSpec
from harness.ssd.devices import describe_path
from harness.telemetry.phase_io import PhaseReadBytes
from harness.workloads import PromptItem, select_prompts

log = logging.getLogger(__name__)


class PeerUnavailable(Exception):
    """The peer cannot run on this machine (package missing, converter missing): the cell is skipped."""


def workload(spec: RunSpec, model_dir: Path) -> tuple[list[PromptItem], str]:
    return select_prompts(spec, bool(getattr(load_config(model_dir), HARNESS_MARKER, None)))


def decode_loop(
    step: Callable[[list[int], bool], int],
    prompt_ids: list[int],
    max_new_tokens: int,
    mode: str,
    reference_ids: list[int] | None,
    phases: PhaseReadBytes,
) -> SequenceLog:
    """The harness's loop for a peer: `step(ids, first)` feeds tokens and returns the argmax next token."""
    seq = SequenceLog(prompt_tokens=len(prompt_ids))
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
        seq.step_start_s.append(start)
        seq.step_s.append(time.perf_counter() - start)
        seq.token_ids.append(token)
    phases.mark(None)
    return seq


def peer_result(
    spec: RunSpec,
    model_dir: Path,
    name: str,
    seqs: list[SequenceLog],
    phases: PhaseReadBytes,
    section: dict[str, Any],
    resolved: dict[str, Any],
    validity: Validity,
    load_s: float,
    mode: str,
) -> dict[str, Any]:
    """A peer's result fields after the head every result shares (`run_peer` adds the head)."""
    enforcement = current_enforcement(spec.ram_budget_bytes)
    validity.note(
        f"{name}: no expert cache of its own, so hit rate is null; SSD bytes are the device reads this process "
        "caused (/proc/self/io: page-cache misses and read-ahead through its memory map)"
    )
    timing = timing_metrics(seqs, spec.warmup_steps, load_s, validity, spec.min_steady_s)
    metrics = {
        **timing,
        "hits": None,
        "hit_rate_decode": None,
        "hit_rate_prefill": None,
        "ssd_read_bytes": phases.total,
        "ssd_read_bytes_by_phase": dict(phases.by_phase),
        "ssd_read_bytes_per_token": (
            phases.by_phase["decode"] / timing["decode_tokens"] if timing["decode_tokens"] else None
        ),
        # The peer's only byte count is the per-process one; the whole-disk window is not taken.
        "device_read_bytes": None,
        "process_read_bytes": phases.total,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cgroup": budget_status(enforcement),
    }
    return {
        "resolved": {
            "model_dir": str(model_dir),
            "model_name": model_name(model_dir),
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


def run_peer(spec: RunSpec, identity: RunIdentity, run_dir: Path, model_dir: Path) -> RunResult:
    """Run the peer named by `spec.strategy`; return its typed result (status ok, or skipped with the reason).
    The caller (harness.run.run_cell, which chooses peers) writes it."""
    from harness.peers import accelerate_peer, llamacpp
    from harness.runtime.strategies.base import split_spec

    name, argument = split_spec(spec.strategy)
    runner = {"accelerate": accelerate_peer.run, "llama.cpp": llamacpp.run}[name]
    phases = PhaseReadBytes()
    try:
        fields = runner(spec, model_dir, run_dir, argument, phases)
    except PeerUnavailable as exc:
        log.warning("peer %s skipped: %s", name, exc)
        return RunResult.envelope(spec, identity, "skipped", f"peer {name} skipped: {exc}", environment=environment())
    return RunResult.envelope(spec, identity, **fields)
