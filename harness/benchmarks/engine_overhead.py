"""Benchmark: the offload engine's per-token CPU cost on the model's thread, split into torch operators,
the model's own Python (transformers), the harness's Python (cache, book, reads, strategy hooks) and the
rest, from a profile of decode steps (CPU time of the calling thread: counts, not wall time, so it means
something on a loaded machine too).

    python -m harness.benchmarks.engine_overhead --model models/olmoe-small --cache-experts 25% \\
        --strategy cache --strategy lookahead+gate [--tokens 24] [--top 25] [--decode-threads 1]

A model with the real layer and expert counts but tiny matrices (see `--help`) makes the harness's share
stand out. The engine is built as `harness run` builds it (same strategy, slots, read backend); the
prompts are the workload's first one, teacher-forced where the model is random-init.

`--interleaved ROUNDS` measures wall time instead: every strategy's engine is built side by side in this one
process and their sequences alternate (the order reversed every other round; round 0 warms up and is left out), and
it prints each strategy's median decode step and its paired difference to the first strategy's in the same round.
Runs in separate processes are a poor A/B of a few percent on a machine whose speed changes from one process to the
next (on this VM, 2 prompts x 40 tokens at 100% cached gave 10.7-18.2 tokens/s over 12 processes); within one
process, the same engine's round medians stayed within +-6%. Each engine holds its own slots (at 100% cached, the
whole model's experts): memory grows with the strategies given.

    python -m harness.benchmarks.engine_overhead --model models/olmoe-small --cache-experts 100% \\
        --strategy cache --strategy lookahead+gate --interleaved 6
"""

from __future__ import annotations

import contextlib
import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import click

from harness.run import _load, plan_run
from harness.runtime.generation import generate
from harness.runtime.recorder import RoutingRecorder, trace_meta
from harness.spec import RunSpec

PARTS = ("torch operators", "transformers Python", "harness Python", "other")


def part_of(filename: str, name: str) -> str:
    """The part of the engine a profile entry's own time belongs to."""
    if filename == "~":
        return "torch operators" if "torch" in name or "Tensor" in name else "other"
    if "/transformers/" in filename:
        return "transformers Python"
    if "/harness/" in filename:
        return "harness Python"
    return "other"


def profile_decode(spec: RunSpec, tokens: int, results: Path) -> tuple[pstats.Stats, int, float]:
    """(profile of the decode steps, decode steps profiled, the thread's CPU seconds over them)."""
    plan = plan_run(spec, results)
    ids, ref = plan.encoded[0]
    recorder = RoutingRecorder(trace_meta(str(spec.model), plan.config, plan.index, "engine-overhead"))
    profiler = cProfile.Profile(time.thread_time)
    with contextlib.ExitStack() as stack:
        engine = _load(plan, recorder, stack).engine
        # One unprofiled sequence first: lazy imports, first-call caches, the cache's warm-up misses.
        threads = spec.decode_threads
        generate(engine.model, ids, tokens, plan.decode_mode, ref, engine.ctx, seq_id=0, decode_threads=threads)
        started: list[float] = []

        def on_token(_: int) -> None:
            if not started:  # the first token ends the prefill: profile the decode steps only
                started.append(time.thread_time())
                profiler.enable()

        log = generate(
            engine.model,
            ids,
            tokens,
            plan.decode_mode,
            ref,
            engine.ctx,
            seq_id=1,
            on_token=on_token,
            decode_threads=threads,
        )
        profiler.disable()
        cpu_s = time.thread_time() - started[0]
    return pstats.Stats(profiler), len(log.step_s), cpu_s


def interleaved_steps(specs: list[RunSpec], tokens: int, rounds: int, results: Path) -> list[list[float]]:
    """Per spec, the median decode step (seconds) of each round after the first: the specs' engines built side by
    side in this process, one sequence each per round, in the given order in even rounds and reversed in odd ones."""
    steps: list[list[float]] = [[] for _ in specs]
    with contextlib.ExitStack() as stack:
        runs = []
        for i, spec in enumerate(specs):
            plan = plan_run(spec, results / str(i))
            recorder = RoutingRecorder(trace_meta(str(spec.model), plan.config, plan.index, "engine-overhead"))
            runs.append((plan, _load(plan, recorder, stack).engine))
        for round_ in range(rounds):
            order = range(len(specs)) if round_ % 2 == 0 else reversed(range(len(specs)))
            for i in order:
                plan, engine = runs[i]
                ids, ref = plan.encoded[0]
                threads = specs[i].decode_threads
                log = generate(
                    engine.model, ids, tokens, plan.decode_mode, ref, engine.ctx, round_, decode_threads=threads
                )
                if round_ > 0 and log.step_s:
                    steps[i].append(statistics.median(log.step_s))
    return steps


def report_interleaved(names: tuple[str, ...], steps: list[list[float]], share: str, tokens: int) -> None:
    click.echo(
        f"decode steps at {share} cached, {len(steps[0])} rounds of {tokens} tokens in one process (ms per step):"
    )
    for i, name in enumerate(names):
        ms = [1e3 * s for s in steps[i]]
        line = f"  {name:<28} {statistics.median(ms):7.2f}  (rounds {min(ms):.2f}-{max(ms):.2f})"
        if i:
            paired = [1e3 * (a - b) for a, b in zip(steps[i], steps[0], strict=True)]
            line += (
                f"  {statistics.median(paired):+.2f} against {names[0]} in the same round "
                f"(range {min(paired):+.2f} to {max(paired):+.2f})"
            )
        click.echo(line)


@click.command()
@click.option("--model", required=True, help="Model folder (packed or packable).")
@click.option("--cache-experts", default="25%", show_default=True, help="Cache size, as `harness run`.")
@click.option("--strategy", "strategies", multiple=True, default=("cache",), show_default=True)
@click.option("--tokens", default=24, show_default=True, help="Decode steps profiled.")
@click.option("--top", default=20, show_default=True, help="Harness functions listed, by own CPU time.")
@click.option("--ssd", default=None, help="Folder on the SSD for the expert file (as `harness run --ssd`).")
@click.option("--decode-threads", type=int, default=None, help="torch threads during decode (default: torch's).")
@click.option(
    "--interleaved",
    "rounds",
    type=click.IntRange(min=0),
    default=0,
    help="Rounds of wall-time steps, the strategies' engines side by side in this process (0: the CPU profile).",
)
def main(
    model: str,
    cache_experts: str,
    strategies: tuple[str, ...],
    tokens: int,
    top: int,
    ssd: str | None,
    decode_threads: int | None,
    rounds: int,
) -> None:
    specs = [
        RunSpec(
            model=model,
            cache_experts=cache_experts,
            policy="lru",
            strategy=name,
            ssd=ssd,
            max_prompts=1,
            max_new_tokens=tokens,
            min_steady_s=0,
            decode_threads=decode_threads,
        )
        for name in strategies
    ]
    if rounds:
        if rounds < 2 or tokens < 2:
            raise click.UsageError("--interleaved needs 2 rounds (round 0 warms up) of 2 tokens or more")
        with tempfile.TemporaryDirectory() as results:
            step_s = interleaved_steps(specs, tokens, rounds, Path(results))
        report_interleaved(strategies, step_s, cache_experts, tokens)
        return
    for name, spec in zip(strategies, specs, strict=True):
        with tempfile.TemporaryDirectory() as results:
            stats, steps, cpu_s = profile_decode(spec, tokens, Path(results))
        own_s = dict.fromkeys(PARTS, 0.0)
        rows = []
        for (filename, _, func), (_, calls, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
            part = part_of(filename, func)
            own_s[part] += tottime
            if part == "harness Python":
                rows.append((tottime, calls, f"{Path(filename).name}:{func}"))
        threads = decode_threads or "default"
        click.echo(
            f"\n{name} at {cache_experts}, decode threads {threads}: {steps} decode steps, "
            f"{1e3 * cpu_s / steps:.2f} CPU ms per token"
        )
        for part in PARTS:
            click.echo(f"  {part:<20} {1e3 * own_s[part] / steps:8.2f} CPU ms per token")
        click.echo("  harness functions by own CPU time (ms per token, calls per token):")
        for tottime, calls, where in sorted(rows, reverse=True)[:top]:
            click.echo(f"    {1e3 * tottime / steps:8.3f}  {calls / steps:8.1f}  {where}")


if __name__ == "__main__":
    main()
