"""Benchmark: the offload engine's per-token CPU cost on the model's thread, split into torch operators,
the model's own Python (transformers), the harness's Python (cache, book, reads, strategy hooks) and the
rest, from a profile of decode steps (CPU time of the calling thread: counts, not wall time, so it means
something on a loaded machine too).

    python -m harness.benchmarks.engine_overhead --model models/olmoe-small --cache-experts 25% \\
        --strategy cache --strategy lookahead+gate [--tokens 24] [--top 25] [--decode-threads 1]

A model with the real layer and expert counts but tiny matrices (see `--help`) makes the harness's share
stand out. The engine is built as `harness run` builds it (same strategy, slots, read backend); the
prompts are the workload's first one, teacher-forced where the model is random-init.
"""

from __future__ import annotations

import contextlib
import cProfile
import pstats
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


@click.command()
@click.option("--model", required=True, help="Model folder (packed or packable).")
@click.option("--cache-experts", default="25%", show_default=True, help="Cache size, as `harness run`.")
@click.option("--strategy", "strategies", multiple=True, default=("cache",), show_default=True)
@click.option("--tokens", default=24, show_default=True, help="Decode steps profiled.")
@click.option("--top", default=20, show_default=True, help="Harness functions listed, by own CPU time.")
@click.option("--ssd", default=None, help="Folder on the SSD for the expert file (as `harness run --ssd`).")
@click.option("--decode-threads", type=int, default=None, help="torch threads during decode (default: torch's).")
def main(
    model: str,
    cache_experts: str,
    strategies: tuple[str, ...],
    tokens: int,
    top: int,
    ssd: str | None,
    decode_threads: int | None,
) -> None:
    for name in strategies:
        spec = RunSpec(
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
