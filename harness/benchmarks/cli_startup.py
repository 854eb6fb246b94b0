"""Benchmark: wall time of the CLI's start-up, median of N runs of each command in a fresh process.

    python -m harness.benchmarks.cli_startup [--runs 10]

Times `harness --help`, `harness --version` and `harness simulate --help` (each `python -m harness ...`
in its own process, as a sweep cell or a shell starts it), and `python -c pass` as the interpreter's own
floor. Run it on a quiet machine: other load inflates every figure.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import click

_TIMED = (["--help"], ["--version"], ["simulate", "--help"])
COMMANDS = [("python -c pass", ["-c", "pass"]), *((f"harness {' '.join(a)}", ["-m", "harness", *a]) for a in _TIMED)]


def wall_s(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


@click.command()
@click.option("--runs", default=10, show_default=True, type=click.IntRange(1), help="Runs per command.")
def main(runs: int) -> None:
    for label, argv in COMMANDS:
        times = [wall_s(argv) for _ in range(runs)]
        click.echo(f"{label:28s} median {statistics.median(times):.3f} s  min {min(times):.3f} s  ({runs} runs)")


if __name__ == "__main__":
    main()
