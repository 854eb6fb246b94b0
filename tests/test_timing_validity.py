"""A run is INVALID below a minimum count of steady decode steps or a minimum steady decode duration."""

from __future__ import annotations

from harness.results import Validity
from harness.runtime.generation import SequenceLog
from harness.runtime.timing import MIN_STEADY_DECODE_S, MIN_STEADY_DECODE_STEPS, timing_metrics


def _assess(steps: int, step_s: float, warmup: int = 2) -> tuple[Validity, dict]:
    validity = Validity()
    log = SequenceLog(prompt_tokens=4, prefill_s=0.1, step_s=[step_s] * (steps + warmup))
    return validity, timing_metrics([log], warmup, 1.0, validity)


def test_enough_steps_and_time_is_valid():
    # 20 steady steps of 0.3 s: 6 s >= 5 s and 20 >= 16.
    validity, metrics = _assess(20, 0.3)
    assert validity.valid and metrics["decode_steady_tokens"] == 20
    assert abs(metrics["decode_tokens_per_s"] - 1 / 0.3) < 1e-9


def test_too_short_is_invalid_even_with_enough_steps():
    # 40 steps of 0.1 s: 4 s < 5 s.
    validity, _ = _assess(40, 0.1)
    assert not validity.valid
    assert validity.reasons == [f"steady-state decode lasted 4.00 s (< {MIN_STEADY_DECODE_S:g} s)"]


def test_too_few_steps_is_invalid_even_when_long():
    validity, _ = _assess(MIN_STEADY_DECODE_STEPS - 1, 1.0)
    assert not validity.valid and len(validity.reasons) == 1
    assert "steady-state decode steps" in validity.reasons[0]
