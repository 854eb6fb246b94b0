"""Timing figures of decode loops, the same for the offload engine and the peers: throughput, time to first
token and per-token latency percentiles, with warm-up steps excluded from the steady-state figures."""

from __future__ import annotations

from typing import Any

import numpy as np

from harness.results import Validity
from harness.runtime.generation import SequenceLog

# A run needs both a minimum count and a minimum duration, as MLPerf loadgen (min_query_count and min_duration,
# mlperf.conf: 1024 queries and 600 s for SingleStream) and optimum-benchmark (InferenceConfig `iterations` and
# `duration`: at least 10 iterations and 10 s by default) require before a result counts. The values below are
# scaled to a desktop sweep of dozens of cells x 3 repeats, where repeats, not one long run, bound the noise.
MIN_STEADY_DECODE_STEPS = 16
"""Fewer steady-state decode steps than this make tokens/s and latency percentiles unreliable."""
MIN_STEADY_DECODE_S = 5.0
"""Default of RunSpec.min_steady_s: steady-state decode shorter than this (seconds) is INVALID: at the default
10 Hz telemetry it spans 50 samples,
and a disk or CPU frequency hiccup of a few hundred ms moves tokens/s by under 10%."""


def percentiles(values: list[float] | np.ndarray, qs: tuple[int, ...] = (50, 90, 99)) -> dict[str, float | None]:
    if len(values) == 0:
        return {f"p{q}": None for q in qs} | {"mean": None}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs} | {"mean": float(arr.mean())}


def steady_windows(logs: list[SequenceLog], warmup_steps: int) -> list[tuple[float, float]]:
    """(start, end) of every steady-state decode step (warm-up steps excluded), on `time.perf_counter()`."""
    return [
        (start, start + step)
        for seq in logs
        for start, step in zip(seq.step_start_s[warmup_steps:], seq.step_s[warmup_steps:], strict=True)
    ]


def timing_metrics(
    logs: list[SequenceLog],
    warmup_steps: int,
    load_s: float,
    validity: Validity,
    min_steady_s: float = MIN_STEADY_DECODE_S,
) -> dict[str, Any]:
    """The timing part of a result's metrics; fails `validity` when too few steady steps remain or they
    last under `min_steady_s` seconds."""
    steady = [s for seq in logs for s in seq.step_s[warmup_steps:]]
    prefill_tokens = sum(seq.prompt_tokens for seq in logs)
    prefill_s = sum(seq.prefill_s for seq in logs)
    if len(steady) < MIN_STEADY_DECODE_STEPS:
        validity.fail(
            f"only {len(steady)} steady-state decode steps (< {MIN_STEADY_DECODE_STEPS})",
            "raise --max-new-tokens or use more prompts",
        )
    if steady and sum(steady) < min_steady_s:
        validity.fail(
            f"steady-state decode lasted {sum(steady):.2f} s (< {min_steady_s:g} s)",
            "raise --max-new-tokens or use more prompts",
        )
    return {
        "prefill_tokens": prefill_tokens,
        "prefill_tokens_per_s": prefill_tokens / prefill_s if prefill_s else None,
        "decode_tokens": sum(len(seq.step_s) for seq in logs),
        "decode_steady_tokens": len(steady),
        "decode_tokens_per_s": len(steady) / sum(steady) if steady else None,
        "ttft_s": percentiles([seq.prefill_s for seq in logs]),
        "cold_start": {"load_s": load_s, "first_ttft_s": logs[0].prefill_s if logs else None},
        "token_latency_s": percentiles(steady),
    }
