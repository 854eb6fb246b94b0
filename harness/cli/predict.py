"""CLI of what-if predictions: `harness predict` (decode tokens/s from a trace, an SSD profile and a compute time)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from harness.cli.console import make_console
from harness.errors import HarnessError
from harness.units import format_bytes, parse_size

_console = make_console()


@click.command("predict")
@click.option("--trace", "trace_path", type=click.Path(path_type=Path), help="Trace Parquet file to replay.")
@click.option(
    "--profile",
    type=click.Path(path_type=Path),
    help="SSD profile (profile-ssd's, or one of hardware_profiles/published/); with --validate: instead of each "
    "run's own.",
)
@click.option("--policy", "policies", default="lru", show_default=True, help="Comma-separated policies.")
@click.option("--capacity", default="25%", show_default=True, help="Slots per cache group, as for `simulate`.")
@click.option("--scope", type=click.Choice(["per-layer", "global"]), default="per-layer", show_default=True)
@click.option("--io-threads", default=4, show_default=True, help="Expert reads in flight (the run's io_threads).")
@click.option("--compute-s-per-token", type=float, default=None, help="Compute seconds per decode token.")
@click.option(
    "--compute-from",
    type=click.Path(path_type=Path),
    default=None,
    help="result.json of a run to take the compute time from (all experts resident is best).",
)
@click.option("--expert-bytes", default=None, help="Size of one expert (e.g. 3MiB), overriding the trace's.")
@click.option(
    "--validate",
    "validate_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Predict every plain-cache run of this results folder from its own trace and print the error per cell.",
)
def predict_cmd(
    trace_path: Path | None,
    profile: Path | None,
    policies: str,
    capacity: str,
    scope: str,
    io_threads: int,
    compute_s_per_token: float | None,
    compute_from: Path | None,
    expert_bytes: str | None,
    validate_dir: Path | None,
) -> None:
    """Predict decode tokens/s: trace replay (misses) + the profile's read-time model + a measured compute time."""
    from harness.predict import ComputeTime, compute_from_result, predict, validate
    from harness.results import read_json

    for path in (trace_path, profile, compute_from, validate_dir):
        if path is not None and not path.exists():
            raise HarnessError(f"{path} does not exist")
    if compute_s_per_token is not None and compute_from is not None:
        raise HarnessError("give --compute-s-per-token or --compute-from, not both")
    compute = None
    if compute_s_per_token is not None:
        if compute_s_per_token < 0:
            raise HarnessError("--compute-s-per-token must be >= 0")
        compute = ComputeTime(compute_s_per_token, "--compute-s-per-token")
    elif compute_from is not None:
        compute = compute_from_result(read_json(compute_from), str(compute_from))
    if validate_dir is not None:
        checks, used, skipped = validate(validate_dir, profile, compute)
        for name, per_model in used.items():
            ms = per_model.s_per_token * 1e3
            _console.print(f"compute time of {name}: {ms:.2f} ms per token ({per_model.source})")
        table = Table(title=f"prediction vs measurement, {validate_dir}")
        for name in ("run_id", "policy", "slots", "budget", "profile", "predicted tok/s", "measured tok/s", "error"):
            table.add_column(name, justify="right")
        for c in checks:
            table.add_row(
                c.run_id,
                c.policy,
                str(c.capacity_slots),
                format_bytes(c.ram_budget_bytes) if c.ram_budget_bytes else "-",
                Path(c.profile).name,
                f"{c.predicted.decode_tokens_per_s:.3g}",
                f"{c.measured_tokens_per_s:.3g}",
                f"{c.error_pct:+.1f}%",
            )
        _console.print(table)
        for line in skipped:
            _console.print(f"skipped {line}")
        return
    if trace_path is None or profile is None:
        raise HarnessError("predict needs --trace and --profile (or --validate RESULTS_DIR)")
    if compute is None:
        raise HarnessError("predict needs a compute time: --compute-from RESULT.json or --compute-s-per-token")
    from harness.ssd.readtime import ReadTimeModel
    from harness.trace.schema import read_trace
    from harness.trace.simulate import build_replay, parse_capacities

    trace = read_trace(trace_path)
    replay = build_replay(trace)
    if expert_bytes is not None:
        replay.expert_bytes = parse_size(expert_bytes)
    slots = parse_capacities(capacity, trace.meta.num_experts, len(replay.layers), scope)  # type: ignore[arg-type]
    model = ReadTimeModel.from_profile(profile)
    names = [p.strip() for p in policies.split(",") if p.strip()]
    rows = predict(replay, model, compute, names, slots, scope, io_threads)  # type: ignore[arg-type]
    _console.print(f"compute time: {compute.s_per_token * 1e3:.2f} ms per token ({compute.source})")
    _console.print(f"SSD: {profile} ({model.device or 'unknown device'}); expert {format_bytes(replay.expert_bytes)}")
    table = Table(title=f"predicted decode speed, {trace_path.name}, scope {scope}, {io_threads} reads in flight")
    for name in ("policy", "slots", "hit rate", "misses/token", "SSD ms/token", "compute ms/token", "tokens/s"):
        table.add_column(name, justify="right")
    for p in rows:
        table.add_row(
            p.policy,
            str(p.capacity_slots),
            f"{p.hit_rate_decode:.4f}",
            f"{p.misses_per_token:.2f}",
            f"{p.ssd_s_per_token * 1e3:.2f}",
            f"{p.compute_s_per_token * 1e3:.2f}",
            f"{p.decode_tokens_per_s:.3g}",
        )
    _console.print(table)


commands: list[click.Command] = [predict_cmd]
