"""Benchmark: replay speed of every policy through the shared cache loop, in accesses per second.

    python -m harness.benchmarks.replay_speed [--trace T | --flame-dir DIR] [--capacity 12.5%,25%,50%] [--repeat 5]
        [--scope per-layer|global]

By default it imports the FLAME slice in the repository (`tests/data/flame-moe-290m`, two layers) with
512-token sequences. An access is one (step, layer, distinct expert). Speed is accesses / CPU seconds of
this process (one core; `time.process_time`, steadier than wall time on a shared machine), best of
`--repeat` runs; the trace preparation (`build_replay`, once per trace) is timed on its own. The row
`lru (all resident)` has room for every expert, so nothing is evicted: it measures the loop's own cost.
`--scope global` replays one cache for all layers, the capacities a share of all layers' experts (as `harness
simulate --scope global`): there a scan policy looks at every resident expert for each victim, so its speed
falls as the cache grows.
The first line gives this interpreter's speed on a plain loop (ns per iteration), so that figures taken
on different machines can be set side by side. Each policy replays once untimed before its measured runs: the
compiled policies (`harness.cache.compiled`) are compiled (or loaded from numba's disk cache) when the
policies are imported, and a compiled policy class's replay loop when it first replays.

The learned policies run as they would in `harness simulate`: `reuse-logit` with the trace's own profile
(its warm start on the profile's steps is learned once per profile and kept, so the best of `--repeat`
runs is replay alone), `flashmoe` with a network trained on the trace beforehand (`TRAIN_EPOCHS`; training
is not timed, and the network's size, not its quality, sets the speed).
"""

from __future__ import annotations

import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from harness.cache.learned import TrainSettings, build_model
from harness.keys import Scope
from harness.trace.importers import import_flame
from harness.trace.schema import read_trace
from harness.trace.simulate import Replay, build_replay, parse_capacities, profile_of, run_replay
from harness.trace.train import layer_streams

DEFAULT_FLAME = Path(__file__).resolve().parents[2] / "tests" / "data" / "flame-moe-290m"
POLICIES = (
    "lru",
    "lfu",
    "fwlru",
    "lrfu",
    "lrfu-admit",
    "lrfu-prior",
    "sieve",
    "s3fifo",
    "arc",
    "least-stale",
    "layer-lru",
    "lecar",
    "random",
    "lfu-window:128",
    "static",
    "static-oracle",
    "belady",
    "belady-bypass",
    "reuse-logit",
    "flashmoe",
)
TRAIN_EPOCHS = 3
"""Epochs of the benchmark's own FlashMoE network (any weights of the right shape replay at the same speed)."""


@click.command()
@click.option("--trace", "trace_path", type=click.Path(path_type=Path), default=None, help="A harness trace.")
@click.option("--flame-dir", type=click.Path(path_type=Path), default=DEFAULT_FLAME, show_default=True)
@click.option("--capacity", default="12.5%,25%,50%", show_default=True)
@click.option("--policy", "policies", default=",".join(POLICIES), show_default=True)
@click.option("--repeat", default=5, show_default=True, help="Runs per cell; the fastest counts.")
@click.option("--scope", type=click.Choice(["per-layer", "global"]), default="per-layer", show_default=True)
def main(trace_path: Path | None, flame_dir: Path, capacity: str, policies: str, repeat: int, scope: Scope) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if trace_path is None:
            trace_path = Path(tmp) / "flame.parquet"
            import_flame(sorted(flame_dir.glob("*.pt")), trace_path, sequence_length=512)
        trace = read_trace(trace_path)
    started = time.process_time()
    replay = build_replay(trace)
    prepare_s = time.process_time() - started
    accesses = replay.accesses
    profile = profile_of(replay)  # for profiled policies (`static`): the trace's own, as `static:TRACE` would read
    context: dict[str, object] = {"profile": profile}
    if "flashmoe" in policies.split(","):
        settings = TrainSettings(max_epochs=TRAIN_EPOCHS)
        context["flashmoe_model"] = build_model(layer_streams(replay), trace.meta.num_experts, settings, {})
    layers = len(trace.meta.moe_layers)
    slots = parse_capacities(capacity, trace.meta.num_experts, layers, scope)
    click.echo(f"python {platform.python_version()}: {_loop_ns():.0f} ns per iteration of `for i in range(n): x += i`")
    click.echo(f"trace {trace_path}: {accesses} accesses; build_replay {prepare_s:.3f} s CPU (once per trace); {scope}")
    click.echo(f"{'policy':<22}" + "".join(f"{f'{c} slots':>16}" for c in slots) + "   (million accesses / CPU s)")
    whole = trace.meta.num_experts * (layers if scope == "global" else 1)
    cells = [(p, slots) for p in policies.split(",")] + [("lru", [whole])]
    for policy, capacities in cells:
        _cpu_seconds(replay, policy, capacities[0], scope, context)  # warm-up, untimed
        rates = []
        for c in capacities:
            best = min(_cpu_seconds(replay, policy, c, scope, context) for _ in range(repeat))
            rates.append(f"{accesses / best / 1e6:>16.2f}")
        label = policy if capacities is slots else f"{policy} (all resident)"
        click.echo(f"{label:<22}" + "".join(rates))


def _loop_ns(n: int = 2_000_000, repeat: int = 5) -> float:
    """CPU nanoseconds per iteration of a plain integer loop, best of `repeat`: the interpreter's speed here."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        x = 0
        for i in range(n):
            x += i
        best = min(best, time.process_time() - started)
    return best / n * 1e9


def _cpu_seconds(replay: Replay, policy: str, capacity: int, scope: Scope, context: dict[str, Any]) -> float:
    started = time.process_time()
    run_replay(replay, policy, capacity, scope, **context)
    return time.process_time() - started


if __name__ == "__main__":
    main()
