"""`python -m harness.telemetry`: measure the telemetry's overhead on this machine and print it as JSON."""

from __future__ import annotations

import json

import click

from harness.telemetry.overhead import default_device, event_cost_s, measure_overhead


@click.command()
@click.option("--seconds", default=10.0, show_default=True, help="Length of one workload trial.")
@click.option("--hz", default=10.0, show_default=True, help="Sampling rate under test.")
@click.option("--trials", default=3, show_default=True, help="Alternating with/without pairs.")
@click.option("--device", default=None, help="Block device to sample (default: the one holding the cwd).")
def main(seconds: float, hz: float, trials: int, device: str | None) -> None:
    """Time a CPU-bound workload with and without telemetry; report slowdown and sampler CPU share."""
    result = measure_overhead(seconds, hz, trials, device or default_device())
    result["event_cost_s"] = event_cost_s()
    click.echo(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
