"""`make bench`: set up the embedded default model and the sweep's other models (a Mixtral-shaped one and
an int4 pack of the default), profile the SSD, train the learned policy, run the default sweep and render
the report. Every stage is a `harness` command, so each one can be rerun
by hand; stages whose output exists are skipped (the sweep itself resumes by run_id).

    python -m harness.bench [--model models/olmoe-small] [--sweep workloads/sweeps/default.yaml]
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import click

from harness.errors import ExitCode, HarnessError

PROFILE_ARGS = [
    "--size",
    "1GiB",
    "--block-size",
    "128KiB,1MiB,expert",
    "--queue-depth",
    "1,4,16",
    "--runtime",
    "1s",
    "--ramp",
    "0.2s",
]
"""A short profile (about a minute): the block sizes and queue depths that expert loading uses."""
ROUTING_TOKENS = 2048
"""Teacher-forced tokens of text recorded to train the learned (FlashMoE-style) policy on; the text
excludes the sweep's workload, so the policy is evaluated on routing it never saw."""


OTHER_MODELS = {"mixtral-small": "mixtral"}
"""Sweep models beside the default one (folder name -> architecture), created with the `small` preset."""
QUANTIZED = ("int4",)
"""Expert dtypes of the default model the sweep also runs: a sibling folder `<model>-<dtype>` linking the
default model's checkpoint files, packed with `--expert-dtype`."""


CHECKPOINT_SUFFIXES = (".json", ".safetensors", ".txt", ".model")
"""Files of a checkpoint folder (config, weights, tokenizer) that a quantized variant links."""


def _quantized_variant(model: Path, dtype: str) -> Path:
    """`<model>-<dtype>`: the checkpoint's files linked (not copied), with a pack of its own."""
    variant = model.with_name(f"{model.name}-{dtype}")
    variant.mkdir(exist_ok=True)
    for source in model.iterdir():
        link = variant / source.name
        if source.suffix in CHECKPOINT_SUFFIXES and not link.exists():
            link.symlink_to(source.resolve())
    _harness("model", "pack", str(variant), "--expert-dtype", dtype)
    return variant


def _harness(*args: str, accept: tuple[int, ...] = (ExitCode.OK,)) -> int:
    """Run one `harness` command; an exit status outside `accept` stops the bench."""
    command = [sys.executable, "-m", "harness", *args]
    click.secho(f"$ harness {' '.join(args)}", fg="cyan", err=True)
    code = subprocess.call(command)
    if code not in accept:
        raise HarnessError(f"`harness {' '.join(args)}` failed with exit status {code}")
    return code


@click.command()
@click.option("--model", type=click.Path(path_type=Path), default=Path("models/olmoe-small"), show_default=True)
@click.option(
    "--sweep", type=click.Path(path_type=Path), default=Path("workloads/sweeps/default.yaml"), show_default=True
)
@click.option("--results", type=click.Path(path_type=Path), default=Path("results/bench"), show_default=True)
@click.option("--report", type=click.Path(path_type=Path), default=Path("reports/latest"), show_default=True)
@click.option("--profile/--no-profile", default=True, show_default=True, help="Profile the model's SSD first.")
def main(model: Path, sweep: Path, results: Path, report: Path, profile: bool) -> None:
    """Set up, then run the default sweep on the embedded default model and render the report."""
    started = time.perf_counter()
    try:
        if not (model / "config.json").exists():
            _harness("model", "create", "--arch", "olmoe", "--preset", "small", "--out", str(model))
        _harness("model", "pack", str(model))
        for name, arch in OTHER_MODELS.items():
            other = model.with_name(name)
            if not (other / "config.json").exists():
                _harness("model", "create", "--arch", arch, "--preset", "small", "--out", str(other))
            _harness("model", "pack", str(other))
        for dtype in QUANTIZED:
            _quantized_variant(model, dtype)
        if profile:
            _harness("profile-ssd", "--path", str(model.resolve().parent), "--model", str(model), *PROFILE_ARGS)
        learned = model / "flashmoe.pt"
        if not learned.exists():
            trace = model / "routing-teacher-forced.parquet"
            subprocess.check_call(
                [
                    sys.executable,
                    "-m",
                    "harness.benchmarks.routing",
                    "--model",
                    str(model),
                    "--tokens",
                    str(ROUTING_TOKENS),
                    "--out",
                    str(trace),
                ]
            )
            _harness("policy", "train", "--trace", str(trace), "--out", str(learned))
        # INVALID or failed cells still get a report (it shows why); the bench then exits with the sweep's status.
        swept = _harness(
            "sweep", str(sweep), "--results", str(results), accept=(ExitCode.OK, ExitCode.INVALID, ExitCode.FAILED)
        )
        _harness("report", str(results), "--out", str(report))
    except (HarnessError, subprocess.CalledProcessError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    minutes = (time.perf_counter() - started) / 60
    click.echo(f"bench done in {minutes:.1f} min; report: {(report / 'index.html').resolve()}")
    sys.exit(swept)


if __name__ == "__main__":
    main()
