"""What-if: decode tokens/s of a policy at a capacity on an SSD you may not own, from a routing trace.

    seconds per decode token = compute_s_per_token + sum over MoE layers of
                               read_time(misses of the layer per token x expert bytes, at the run's I/O depth)

The misses come from replaying the trace through the policy (`harness.trace.simulate`, the loop the
engine runs); the read time from the SSD profile's read-time model (`harness.ssd.readtime`, measured
or built from published figures); the compute time is measured: from a run whose experts were all
resident, or from any run as its decode time minus the time it waited for expert reads. The model
is serial, as the plain cache is: a layer's misses are read before it computes. Strategies that
overlap reads with compute (prefetch) run faster than it predicts.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.keys import Scope
from harness.ssd.readtime import ReadTimeModel
from harness.trace.simulate import Replay, SimulationResult, build_replay, run_replay

log = logging.getLogger(__name__)

DEFAULT_IO_THREADS = 4
"""Expert reads in flight per layer when the caller names none: RunSpec.io_threads' default."""


@dataclass(frozen=True)
class ComputeTime:
    """Seconds of compute per decode token, and where the figure came from."""

    s_per_token: float
    source: str


@dataclass
class Prediction:
    policy: str
    capacity_slots: int
    hit_rate_decode: float
    misses_per_token: float
    ssd_s_per_token: float
    compute_s_per_token: float

    @property
    def decode_tokens_per_s(self) -> float:
        return 1.0 / (self.compute_s_per_token + self.ssd_s_per_token)


def compute_from_result(result: dict[str, Any], source: str = "") -> ComputeTime:
    """Compute seconds per decode token of a run: its decode time per token minus its expert-read wait share.

    For a run with every expert resident the wait is zero and this is its decode time per token.
    """
    metrics = result.get("metrics") or {}
    tps = metrics.get("decode_tokens_per_s")
    if result.get("status") != "ok" or not tps:
        raise HarnessError(f"{source or 'the result'} is not a successful run with a decode rate")
    share = (metrics.get("expert_wait_share_pct") or 0.0) / 100
    hit = metrics.get("hit_rate_decode")
    how = "all experts resident" if share == 0 or hit == 1 else f"minus its {100 * share:.1f}% expert-read wait"
    return ComputeTime((1.0 - share) / tps, f"{source or 'a run'}: 1 / {tps:.3g} tokens/s, {how}")


def ssd_seconds_per_token(sim: SimulationResult, model: ReadTimeModel, io_threads: int) -> float:
    """Read time per decode token: per layer, that layer's mean decode misses read together at the I/O depth."""
    tokens = sim.tokens["decode"]
    if not tokens:
        raise HarnessError("the trace has no decode steps to predict decode speed from")
    if not sim.expert_bytes:
        raise HarnessError("the trace does not know the expert size: pass --expert-bytes")
    total = 0.0
    for counts in sim.counts["decode"].values():
        nbytes = round(counts.misses * sim.expert_bytes / tokens)
        total += model.seconds(nbytes, io_threads, sim.expert_bytes)
    return total


def predict(
    replay: Replay,
    model: ReadTimeModel,
    compute: ComputeTime,
    policies: list[str],
    capacities: list[int],
    scope: Scope = "per-layer",
    io_threads: int = DEFAULT_IO_THREADS,
    seed: int = 0,
) -> list[Prediction]:
    """One Prediction per (policy, capacity)."""
    out = []
    for policy in policies:
        for slots in capacities:
            sim = run_replay(replay, policy, slots, scope, seed)
            decode = sim.total("decode")
            out.append(
                Prediction(
                    policy=policy,
                    capacity_slots=slots,
                    hit_rate_decode=decode.hit_rate,
                    misses_per_token=decode.misses / sim.tokens["decode"] if sim.tokens["decode"] else 0.0,
                    ssd_s_per_token=ssd_seconds_per_token(sim, model, io_threads),
                    compute_s_per_token=compute.s_per_token,
                )
            )
    return out


@dataclass
class Check:
    """One live run beside the prediction for its own trace, policy, capacity and SSD profile."""

    run_id: str
    policy: str
    capacity_slots: int
    ram_budget_bytes: int | None
    profile: str
    measured_tokens_per_s: float
    predicted: Prediction

    @property
    def error_pct(self) -> float:
        return 100 * (self.predicted.decode_tokens_per_s / self.measured_tokens_per_s - 1)


def _runs(results_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    from harness.results import read_json

    found = []
    for path in sorted(results_dir.rglob("result.json")):
        try:
            result = read_json(path)
        except (OSError, ValueError):
            continue
        if isinstance(result, dict) and result.get("status") == "ok":
            found.append((path.parent, result))
    return found


def reference_compute(runs: list[tuple[Path, dict[str, Any]]]) -> ComputeTime:
    """The median compute time of the runs (each: decode time per token minus its read wait): robust to a noisy run."""
    usable = [(f, r) for f, r in runs if (r.get("metrics") or {}).get("decode_tokens_per_s")]
    if not usable:
        raise HarnessError("no successful run with a decode rate to take the compute time from")
    times = sorted(compute_from_result(r, str(f / "result.json")).s_per_token for f, r in usable)
    median = statistics.median(times)
    return ComputeTime(median, f"median of {len(times)} runs' decode time per token minus their expert-read wait")


def validate(
    results_dir: Path, profile: Path | None = None, compute: ComputeTime | None = None
) -> tuple[list[Check], dict[str, ComputeTime], list[str]]:
    """Predict every plain-cache run of a sweep (one machine) from its own trace.

    Returns the checks, the compute time used per model and the runs skipped (with why). Each run uses
    `profile` when given, else the profile its result names. The compute time is `compute` when given,
    else, per model (models differ in compute: shape, expert dtype), the median over that model's runs
    (`reference_compute`).
    """
    runs = _runs(results_dir)
    if not runs:
        raise HarnessError(f"no successful result.json under {results_dir}")
    by_model: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for folder, result in runs:
        by_model.setdefault(str((result.get("resolved") or {}).get("model_name") or ""), []).append((folder, result))
    checks: list[Check] = []
    used: dict[str, ComputeTime] = {}
    skipped: list[str] = []
    for model, group in sorted(by_model.items()):
        used[model] = compute or reference_compute(group)
        group_checks, group_skipped = validate_runs(group, used[model], profile)
        checks += group_checks
        skipped += group_skipped
    return checks, used, skipped


def validate_runs(
    runs: list[tuple[Path, dict[str, Any]]], compute: ComputeTime, profile: Path | None = None
) -> tuple[list[Check], list[str]]:
    """The checks of `validate` for runs already read (folder, result), with one compute time for all."""
    from harness.trace.schema import read_trace

    checks: list[Check] = []
    skipped: list[str] = []
    for folder, result in runs:
        run_id = str(result.get("run_id"))
        resolved = result.get("resolved") or {}
        if resolved.get("strategy", "cache") != "cache":
            skipped.append(f"{run_id}: strategy {resolved.get('strategy')}: the serial model is for the plain cache")
            continue
        path = profile or (Path(result["hardware_profile"]) if result.get("hardware_profile") else None)
        trace_path = folder / ((result.get("files") or {}).get("trace") or "trace.parquet")
        if path is None or not path.is_file():
            skipped.append(f"{run_id}: no SSD profile (pass --profile)")
            continue
        if not trace_path.is_file() or not resolved.get("cache_slots"):
            skipped.append(f"{run_id}: no trace or no cache size")
            continue
        try:
            replay = build_replay(read_trace(trace_path))
            if resolved.get("expert_bytes"):
                replay.expert_bytes = int(resolved["expert_bytes"])
            (prediction,) = predict(
                replay,
                ReadTimeModel.from_profile(path),
                compute,
                [str(resolved.get("policy"))],
                [int(resolved["cache_slots"])],
                resolved.get("scope") or "per-layer",
                int(resolved.get("io_threads") or DEFAULT_IO_THREADS),
                int((result.get("spec") or {}).get("seed") or 0),
            )
        except (HarnessError, OSError, ValueError) as exc:  # e.g. a learned policy's model file not on this machine
            skipped.append(f"{run_id}: {exc}")
            continue
        checks.append(
            Check(
                run_id,
                str(resolved.get("policy")),
                int(resolved["cache_slots"]),
                resolved.get("ram_budget_bytes"),
                str(path),
                float(result["metrics"]["decode_tokens_per_s"]),
                prediction,
            )
        )
    return checks, skipped
