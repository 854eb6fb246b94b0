"""Benchmark: how close each look-ahead strategy gets to the I/O floor, against the plain LRU cache; and
the runtime's expert-read throughput against fio's on the same file, block size and queue depth.

    python -m harness.benchmarks.floor --model models/olmoe-small --ssd /mnt/nvme/scratch \\
        [--shares 25%,50%] [--strategy cache --strategy lookahead+gate ...] [--decode-threads default,1] \\
        [--io-depths profile,1,4] [--rounds 3] [--max-new-tokens 48] [--io-repeats 5] \\
        [--results results/floor-bench] [--reads-only]

Each (round, cache share, decode threads, queue depth, strategy) cell is one `harness run` in its own process (policy
LRU, the same prompts, teacher-forced where the model is random-init), cells interleaved so a drift of the
machine spreads over all strategies; the table gives medians over rounds of decode tokens/s,
decode_floor_ratio, the share of decode time the disk had an expert read in flight (`decode_device_busy_share`:
near 100% the run is held by its bytes, not by reads waiting for the model) and prediction recall (a shadow
predictor's beside OD-MoE's published recall). Then the
expert file is read at random, expert-sized blocks at each queue depth the runs used, by the runtime's own read
backend (every read checked, as in a run) and by fio (io_uring, --direct=1, the same huge-page-aligned
buffers), each with the same ramp and duration, in `--io-repeats` rounds whose order alternates, and, where
io_uring works, by the profiler's ring (fio's loop) rotating over as many buffers as the runtime's loop (2 per read
in flight: the reads in flight and those queued behind them): runtime/ring is the runtime's own cost, ring/fio what
spreading reads over more buffers costs on this machine (a VM whose host copies each read into guest memory can pay
for it; a cache reads into many different slots). It prints each round and the medians and ranges of the ratios.
`--reads-only` runs that comparison alone (no cell), on the model's pack, or its copy in `--ssd`.
The floor needs an SSD profile of the disk (`harness profile-ssd`). Its compute time (the whole model resident) is
measured by each cell's own process right after its run by default (`--compute per-cell`), since the figure a ratio
divides by should be the machine's speed when the run ran: on this VM a figure cached hours before was a third off
(70.6 ms per token one day, 46-61 ms the next), and figures measured by adjacent cells a minute apart ranged 48-72 ms.
`--compute per-round` measures it once per round (by the round's first cell, the others reading it; a resident decode
less per cell), `--compute cached` uses the harness's cache. Run it on a quiet machine.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from harness.errors import ExitCode
from harness.models.locate import model_name
from harness.models.packer import pack_paths
from harness.runtime.expert_io import make_backend, queue_depth_from_profile
from harness.runtime.floor import COMPUTE_CACHE_ENV
from harness.spec import RunSpec
from harness.ssd.engine import resolve_backend, run_job
from harness.ssd.fio import fio_command, fio_path, run_fio
from harness.ssd.jobs import JobSpec
from harness.ssd.readtime import load_profile_for_path
from harness.store.layout import PackIndex
from harness.store.placement import place_expert_file
from harness.store.reader import AlignedPool, ExpertReader


def run_cell(spec: RunSpec, results: Path, compute_cache: Path | None = None) -> dict[str, Any] | str:
    """One `harness run` in a fresh process (its floor's compute figure cached in `compute_cache`, if given); its
    result document, or the one-line reason it was refused (e.g. a shadow predictor that does not fit the share)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec.canonical(), f)
    cmd = [sys.executable, "-m", "harness", "run", "--spec", f.name, "--results", str(results), "--quiet"]
    env = None if compute_cache is None else os.environ | {COMPUTE_CACHE_ENV: str(compute_cache)}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    Path(f.name).unlink()
    path = results / spec.run_id / "result.json"
    if not path.is_file():
        lines = proc.stderr.strip().splitlines()
        if proc.returncode == ExitCode.BAD_INPUT and lines:
            return lines[-1].removeprefix("error: ")
        raise click.ClickException(f"cell {spec.strategy} failed (exit {proc.returncode}): {proc.stderr[-400:]}")
    return json.loads(path.read_text())


COMPUTE_MODES = ("per-cell", "per-round", "cached")
"""Where a cell's floor takes its compute figure from (`--compute`)."""


def compute_folder(root: Path, mode: str, round_: int, cell: int) -> Path | None:
    """The folder, under this invocation's `root`, where cell number `cell` of round `round_` caches its floor's
    compute figure: its round's (per-round: measured by the round's first cell), its own (per-cell: measured by
    each cell after its run), or none (cached: the harness's own cache)."""
    return {"per-round": root / f"round-{round_}", "per-cell": root / f"cell-{cell}"}.get(mode)


ODMOE_RECALL = {"shadow-int8": 0.9734, "shadow-fp16": 0.9994}
"""OD-MoE's published recall of its emulative predictor (int8 and fp16 shadow), beside which ours is printed."""


def median_or_none(values: list[Any]) -> float | None:
    """The median of a figure over a cell's runs, or None where a run lacks it (printed as n/a)."""
    return None if None in values else statistics.median(values)


def recall_of(runs: list[dict[str, Any]]) -> str:
    """Median recall over `runs` of each predictor of a strategy: its own ('own', or the shadow's name, with
    OD-MoE's published figure), the next-layer gate's, and both together."""
    stats = [r.get("strategy", {}).get("stats", {}) for r in runs]
    predictor = str(stats[-1].get("predictor", "own"))
    dense = stats[-1].get("shadow_dense_precision")
    parts = []
    for name in ("prediction", "gate_prediction", "combined_prediction"):
        recall = median_or_none([(s.get(name) or {}).get("recall") for s in stats])
        if recall is None:
            continue
        label = {"prediction": predictor, "gate_prediction": "gate", "combined_prediction": "combined"}[name]
        if name == "prediction" and predictor == "next-layer gate":
            label = "gate"
        part = f"{label} {recall:.3f}"
        if name == "prediction" and dense and not label.endswith(f"-{dense}"):
            part = f"{label} (dense {dense}) {recall:.3f}"
        if label in ODMOE_RECALL:
            part += f" (OD-MoE {ODMOE_RECALL[label]:.4f})"
        parts.append(part)
    return ", ".join(parts) or "-"


RUNTIME_LOOP_BUFFERS = 2
"""Buffers per read in flight in `runtime_read_bytes_per_s`: the reads in flight and as many queued behind them."""


def runtime_read_bytes_per_s(
    experts_file: Path, index: PackIndex, depth: int, seconds: float, seed: int, ramp_s: float = 0.0
) -> tuple[float, int, float]:
    """(bytes/s, reads counted, share of the buffers on huge pages) of random expert reads through the runtime's
    backend (io_uring, else threads), `depth` in flight: as a step with many loads does, the backend holds `depth`
    more reads queued, which it starts as reads finish (before checking the finished ones), so the device always
    has `depth` reads, as fio keeps it. Reads completed in the first `ramp_s` are not counted (fio's ramp_time)."""
    reader = ExpertReader(experts_file, index)
    backend, _ = make_backend(reader, "auto", depth)
    pool = AlignedPool(RUNTIME_LOOP_BUFFERS * depth, index.stride_bytes)
    rng = random.Random(seed)
    keys = [(e.layer, e.expert) for e in index.entries]
    done_bytes = done_reads = 0
    try:
        inflight = backend.submit([(rng.choice(keys), pool.slot(i)) for i in range(pool.slots)], background=False)
        slot_of = {id(read): i for i, read in enumerate(inflight)}
        ramp_end = time.perf_counter() + ramp_s
        start = None
        while start is None or time.perf_counter() - start < seconds:
            if start is None and time.perf_counter() >= ramp_end:
                start = time.perf_counter()
            read = next(backend.as_completed(inflight))
            inflight.remove(read)
            if start is not None:
                done_bytes += read.record.nbytes  # type: ignore[union-attr]
                done_reads += 1
            slot = slot_of.pop(id(read))
            (fresh,) = backend.submit([(rng.choice(keys), pool.slot(slot))], background=False)
            slot_of[id(fresh)] = slot
            inflight.append(fresh)
        elapsed = time.perf_counter() - start
        for read in inflight:
            backend.result(read)
    finally:
        backend.close()
        reader.close()
    return done_bytes / elapsed, done_reads, pool.huge_page_share


READERS = {
    "runtime": f"the runtime's read backend, every read checked, {RUNTIME_LOOP_BUFFERS} x depth buffers",
    "fio": "fio, io_uring, --direct=1, one buffer per read in flight",
    "ring": f"the profiler's ring (fio's loop, no check), rotating over {RUNTIME_LOOP_BUFFERS} x depth buffers",
}
"""What each reader of `compare_reads` is."""
IO_RAMP_S = 1.0
"""Seconds of reads, at the start of each throughput measurement, not counted (runtime and fio alike)."""


def parse_counts(text: str, unset: str, what: str, option: str) -> list[int | None]:
    """A comma-separated cell dimension: 'default,1' -> [None, 1], where `unset` ('default') stands for None (the
    run's own choice) and every other item must be a positive count of `what`."""
    out: list[int | None] = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        if item == unset:
            out.append(None)
        elif item.isdigit() and int(item) >= 1:
            out.append(int(item))
        else:
            raise click.BadParameter(f"{item!r} is neither {unset!r} nor a {what}", param_hint=option)
    return out


def compare_reads(experts_file: Path, index: PackIndex, depth: int, seconds: float, repeats: int) -> None:
    """The runtime's read throughput against fio's, in `repeats` rounds of the same job (order alternating); where
    io_uring works, also against the profiler's ring (fio's loop) reading into as many buffers as the runtime's
    loop, which tells the runtime's own cost from what spreading reads over more buffers costs on this machine."""
    available = {"runtime": True, "fio": fio_path() is not None, "ring": resolve_backend() == "io_uring"}
    if not available["fio"]:
        click.echo("fio is not installed (apt-get install -y fio): no runtime/fio ratio")
    job = JobSpec("randread", index.stride_bytes, depth, True, seconds, IO_RAMP_S, 1)
    size = experts_file.stat().st_size
    buffers = RUNTIME_LOOP_BUFFERS * depth
    who_all = tuple(who for who, here in available.items() if here)
    got_all: dict[str, list[float]] = {}
    for pair in range(repeats):
        order = who_all if pair % 2 == 0 else who_all[::-1]
        got: dict[str, float] = {}
        reads, huge = 0, 0.0
        for who in order:
            if who == "runtime":
                got[who], reads, huge = runtime_read_bytes_per_s(experts_file, index, depth, seconds, pair, IO_RAMP_S)
            elif who == "ring":
                got[who] = run_job(job, str(experts_file), size, seed=pair, buffers=buffers).bw_bytes_per_s
            else:
                cmd = fio_command(job, str(experts_file), size, ioengine="io_uring", readonly=True, seed=pair)
                got[who] = run_fio(cmd, job)[1].bw_bytes_per_s
        for who, value in got.items():
            got_all.setdefault(who, []).append(value)
        line = (
            f"round {pair} ({', '.join(order)}): runtime {got['runtime'] / 1e6:6.0f} MB/s "
            f"({reads} reads, buffers {huge:.0%} on huge pages)"
        )
        line += "".join(f"   {who} {got[who] / 1e6:6.0f} MB/s" for who in ("fio", "ring") if who in got)
        click.echo(line)
    click.echo(f"medians of {repeats} rounds at queue depth {depth}:")
    for who in who_all:
        click.echo(f"  {who:<8} {statistics.median(got_all[who]) / 1e6:6.0f} MB/s  {READERS[who]}")
    for top, bottom in (("runtime", "fio"), ("runtime", "ring"), ("ring", "fio")):
        if top in got_all and bottom in got_all:
            ratios = [a / b for a, b in zip(got_all[top], got_all[bottom], strict=True)]
            click.echo(f"  {top}/{bottom} {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})")


@click.command()
@click.option("--model", required=True, help="Model folder (packed or packable).")
@click.option("--ssd", default=None, help="Folder on the SSD for the expert file (as `harness run --ssd`).")
@click.option("--shares", default="25%,50%", show_default=True, help="Cache sizes (cache_experts).")
@click.option(
    "--strategy",
    "strategies",
    multiple=True,
    default=(
        "cache",
        "prefetch",
        "prefetch:top=4",
        "lookahead",
        "lookahead+gate",
        "lookahead+gate:top=4",
        "on-demand:shadow-int8:2",
    ),
    show_default=True,
    help="A strategy (repeatable); `cache` and every strategy with a policy run with LRU.",
)
@click.option(
    "--recall-strategy",
    "recall_strategies",
    multiple=True,
    help="A strategy run once (first round, first share and thread setting), for its prediction recall (repeatable), "
    "e.g. on-demand:shadow-fp16:2.",
)
@click.option(
    "--decode-threads",
    default="default",
    show_default=True,
    help="torch threads during decode (RunSpec.decode_threads), comma-separated: each value is a cell dimension; "
    "'default' is torch's (all cores). The compute of the floor is measured at the same setting.",
)
@click.option(
    "--io-depths",
    default="profile",
    show_default=True,
    help="Expert reads in flight (RunSpec.io_depth), comma-separated: each value is a cell dimension; 'profile' is "
    "the depth the disk's SSD profile gives.",
)
@click.option("--rounds", default=3, show_default=True)
@click.option(
    "--compute",
    type=click.Choice(COMPUTE_MODES),
    default="per-cell",
    show_default=True,
    help="The floor's compute figure: measured by each cell's process right after its run (the figure closest in "
    "time to the run it divides, so that a drift of the machine moves the floor with the run); once per round (by "
    "its first cell's process, the rest of the round reading it: a resident decode less per cell); or the "
    "harness's cached one.",
)
@click.option("--max-new-tokens", default=48, show_default=True)
@click.option("--workload", default="default", show_default=True, help="Prompt set (its first --prompts prompts).")
@click.option("--prompts", default=1, show_default=True)
@click.option("--read-seconds", default=10.0, show_default=True, help="Duration of each throughput measurement.")
@click.option("--io-repeats", default=5, show_default=True, help="Runtime/fio throughput pairs.")
@click.option("--results", type=click.Path(path_type=Path), default=Path("results/floor-bench"), show_default=True)
@click.option("--reads-only", is_flag=True, help="Only the runtime/fio read comparison, on the model's packed experts.")
def main(
    model: str,
    ssd: str | None,
    shares: str,
    strategies: tuple[str, ...],
    recall_strategies: tuple[str, ...],
    decode_threads: str,
    io_depths: str,
    rounds: int,
    compute: str,
    max_new_tokens: int,
    workload: str,
    prompts: int,
    read_seconds: float,
    io_repeats: int,
    results: Path,
    reads_only: bool,
) -> None:
    packed = pack_paths(Path(model))
    if reads_only:
        if not packed["index"].is_file():
            raise click.UsageError(f"{model} is not packed ({packed['index']} is missing): run `harness run` once")
        index = PackIndex.load(packed["index"])
        experts = place_expert_file(index, packed, ssd, model_name(Path(model)))
        for depth in parse_counts(io_depths, "profile", "queue depth", "--io-depths"):
            read_comparison(experts, index, depth, read_seconds, io_repeats)
        return
    names = list(strategies)
    threads = parse_counts(decode_threads, "default", "thread count", "--decode-threads")
    settings = list(itertools.product(threads, parse_counts(io_depths, "profile", "queue depth", "--io-depths")))
    cells: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    refused: dict[tuple[str, str], str] = {}
    experts_file: Path | None = None
    share_list = [s.strip() for s in shares.split(",")]
    cell_number = itertools.count()
    with tempfile.TemporaryDirectory(prefix="harness-floor-compute-") as compute_root:
        for round_, (i, share), (j, (n_threads, depth)) in itertools.product(
            range(rounds), enumerate(share_list), enumerate(settings)
        ):
            label = f"{'default' if n_threads is None else n_threads}/{'profile' if depth is None else depth}"
            once = list(recall_strategies) if round_ == i == j == 0 else []
            for name in [n for n in names + once if (share, n) not in refused]:
                spec = RunSpec(
                    model=model,
                    cache_experts=share,
                    policy="lru",
                    strategy=name,
                    ssd=ssd,
                    workload=workload,
                    max_prompts=prompts,
                    max_new_tokens=max_new_tokens,
                    decode_threads=n_threads,
                    io_depth=depth,
                    repeat=round_,
                )
                folder = compute_folder(Path(compute_root), compute, round_, next(cell_number))
                result = run_cell(spec, results, folder)
                if isinstance(result, str):
                    refused[share, name] = result
                    click.echo(f"round {round_} {share:>4} {label:<15} {name:<26} refused: {result}")
                    continue
                experts_file = Path(result["resolved"]["expert_file"])
                cells.setdefault((share, label, name), []).append(result)
                m = result["metrics"]
                verdict = "valid" if result["validity"]["valid"] else "INVALID"
                compute_s = (m.get("decode_floor") or {}).get("compute_s_per_token")
                click.echo(
                    f"round {round_} {share:>4} {label:<15} {name:<26} "
                    f"{m['decode_tokens_per_s'] or 0:7.2f} tok/s  "
                    f"floor ratio {m.get('decode_floor_ratio') or float('nan'):.2f}  "
                    f"compute {1e3 * (compute_s or float('nan')):.1f} ms/token  {verdict}"
                )
    click.echo(
        "\ncache  threads/depth    strategy                   tok/s  (range)        floor_ratio  disk_busy  "
        "run/profile MB/s  backend        recall"
    )
    used_depths: set[int] = set()
    for (share, label, name), runs in cells.items():
        all_tps = [r["metrics"]["decode_tokens_per_s"] or 0 for r in runs]
        tps = statistics.median(all_tps)
        spread = f"({min(all_tps):.2f}-{max(all_tps):.2f})"
        ratio = median_or_none([r["metrics"].get("decode_floor_ratio") for r in runs])
        io = runs[-1]["metrics"].get("expert_io") or {}
        if io.get("queue_depth"):
            used_depths.add(int(io["queue_depth"]))
        read_bw = statistics.median(r["metrics"].get("expert_read_throughput_bytes_per_s") or 0 for r in runs)
        busy_share = median_or_none([r["metrics"].get("decode_device_busy_share") for r in runs])
        busy = "n/a" if busy_share is None else f"{busy_share:.0%}"
        floor = runs[-1]["metrics"].get("decode_floor") or {}
        # The reads' rate during the runs beside the profile's at the same block size and depth (the floor's I/O term).
        profiled = floor.get("ssd_bandwidth_bytes_per_s")
        rates = f"{read_bw / 1e6:.0f}/{'n/a' if profiled is None else f'{profiled / 1e6:.0f}'}"
        click.echo(
            f"{share:>5}  {label:<15}  {name:<26} {tps:7.2f}  {spread:<13}  "
            f"{'n/a' if ratio is None else f'{ratio:11.2f}':>11}  "
            f"{busy:>9}  {rates:>16}  {io.get('backend')} qd {io.get('queue_depth')}  {recall_of(runs)}"
        )
        if floor.get("floor_s_per_token") is None:
            click.echo(f"       floor unavailable: compute {floor.get('compute_source')}; io {floor.get('io_source')}")
        for loaded in [f for r in runs if (f := r["metrics"].get("decode_floor") or {}).get("compute_under_load")]:
            click.echo(f"       floor's compute measured under load: {loaded['compute_source']}")
    for (share, name), why in refused.items():
        click.echo(f"{share:>5}  {name}: refused ({why})")

    assert experts_file is not None
    index = PackIndex.load(packed["index"])
    for depth in sorted(used_depths):
        read_comparison(experts_file, index, depth, read_seconds, io_repeats, "a depth the runs used")


def read_comparison(
    experts_file: Path, index: PackIndex, depth: int | None, read_seconds: float, io_repeats: int, how: str = "given"
) -> None:
    """`compare_reads` at queue depth `depth` (`how` says where it came from), or (None) the one a run takes from
    the disk's SSD profile."""
    if depth is None:
        # Without a profile a run reads at its io_threads, by default the spec's.
        io_threads = RunSpec.model_fields["io_threads"].default
        depth, how = queue_depth_from_profile(load_profile_for_path(experts_file), index.stride_bytes, io_threads)
    click.echo(f"\nexpert reads of {index.stride_bytes} B at queue depth {depth} ({how}) on {experts_file}")
    compare_reads(experts_file, index, depth, read_seconds, io_repeats)


if __name__ == "__main__":
    main()
