"""Benchmark: how close each look-ahead strategy gets to the I/O floor, against the plain LRU cache; and
the runtime's expert-read throughput against fio's on the same file, block size and queue depth.

    python -m harness.benchmarks.floor --model models/olmoe-small --ssd /mnt/nvme/scratch \\
        [--shares 25%,50%] [--strategy cache --strategy lookahead+gate ...] \\
        [--rounds 3] [--max-new-tokens 48] [--results results/floor-bench]

Each (round, cache share, strategy) cell is one `harness run` in its own process (policy LRU, the same
prompts, teacher-forced where the model is random-init), cells interleaved so a drift of the machine
spreads over all strategies; the table gives medians over rounds of decode tokens/s, decode_floor_ratio
and prediction recall. Then the expert file is read at random, expert-sized blocks at the runtime's queue
depth, by the runtime's own read backend and by fio (io_uring, --direct=1), alternately, `--rounds` times.
The floor needs an SSD profile of the disk (`harness profile-ssd`) and, once, a run without a RAM budget
(the compute time is measured with the whole model resident and cached). Run it on a quiet machine.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from harness.models.packer import pack_paths
from harness.runtime.expert_io import make_backend, queue_depth_from_profile
from harness.spec import RunSpec
from harness.ssd.fio import fio_command, fio_path, run_fio
from harness.ssd.jobs import JobSpec
from harness.ssd.readtime import load_profile_for_path
from harness.store.layout import PackIndex
from harness.store.reader import AlignedPool, ExpertReader


def run_cell(spec: RunSpec, results: Path) -> dict[str, Any]:
    """One `harness run` in a fresh process; its result document."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec.canonical(), f)
    cmd = [sys.executable, "-m", "harness", "run", "--spec", f.name, "--results", str(results), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    Path(f.name).unlink()
    path = results / spec.run_id / "result.json"
    if not path.is_file():
        raise click.ClickException(f"cell {spec.strategy} failed (exit {proc.returncode}): {proc.stderr[-400:]}")
    return json.loads(path.read_text())


def recall_of(result: dict[str, Any]) -> str:
    stats = result.get("strategy", {}).get("stats", {})
    parts = []
    for name in ("prediction", "gate_prediction", "combined_prediction"):
        recall = (stats.get(name) or {}).get("recall")
        if recall is not None:
            parts.append(f"{name.replace('_prediction', '').replace('prediction', 'own')} {recall:.3f}")
    return ", ".join(parts) or "-"


def runtime_read_bytes_per_s(experts_file: Path, index: PackIndex, depth: int, seconds: float, seed: int) -> float:
    """Random expert reads through the runtime's backend (io_uring, else threads), `depth` in flight: as a
    step with many loads does, the backend holds `depth` more reads queued, which it starts as reads finish
    (before checking the finished ones), so the device always has `depth` reads, as fio keeps it."""
    reader = ExpertReader(experts_file, index)
    backend, _ = make_backend(reader, "auto", depth)
    pool = AlignedPool(2 * depth, index.stride_bytes)
    rng = random.Random(seed)
    keys = [(e.layer, e.expert) for e in index.entries]
    done_bytes = 0
    try:
        inflight = backend.submit([(rng.choice(keys), pool.slot(i)) for i in range(2 * depth)], background=False)
        slot_of = {id(read): i for i, read in enumerate(inflight)}
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            read = next(backend.as_completed(inflight))
            inflight.remove(read)
            done_bytes += read.record.nbytes  # type: ignore[union-attr]
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
    return done_bytes / elapsed


@click.command()
@click.option("--model", required=True, help="Model folder (packed or packable).")
@click.option("--ssd", default=None, help="Folder on the SSD for the expert file (as `harness run --ssd`).")
@click.option("--shares", default="25%,50%", show_default=True, help="Cache sizes (cache_experts).")
@click.option(
    "--strategy",
    "strategies",
    multiple=True,
    default=("cache", "prefetch", "lookahead", "lookahead+gate", "on-demand:shadow-int8:2"),
    show_default=True,
    help="A strategy (repeatable); `cache` and every strategy with a policy run with LRU.",
)
@click.option("--rounds", default=3, show_default=True)
@click.option("--max-new-tokens", default=48, show_default=True)
@click.option("--workload", default="default", show_default=True, help="Prompt set (its first --prompts prompts).")
@click.option("--prompts", default=1, show_default=True)
@click.option("--read-seconds", default=10.0, show_default=True, help="Duration of each throughput measurement.")
@click.option("--results", type=click.Path(path_type=Path), default=Path("results/floor-bench"), show_default=True)
def main(
    model: str,
    ssd: str | None,
    shares: str,
    strategies: tuple[str, ...],
    rounds: int,
    max_new_tokens: int,
    workload: str,
    prompts: int,
    read_seconds: float,
    results: Path,
) -> None:
    names = list(strategies)
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    experts_file: Path | None = None
    for round_ in range(rounds):
        for share in shares.split(","):
            for name in names:
                spec = RunSpec(
                    model=model,
                    cache_experts=share.strip(),
                    policy="lru",
                    strategy=name,
                    ssd=ssd,
                    workload=workload,
                    max_prompts=prompts,
                    max_new_tokens=max_new_tokens,
                    repeat=round_,
                )
                result = run_cell(spec, results)
                experts_file = Path(result["resolved"]["expert_file"])
                cells.setdefault((share.strip(), name), []).append(result)
                m = result["metrics"]
                verdict = "valid" if result["validity"]["valid"] else "INVALID"
                click.echo(
                    f"round {round_} {share:>4} {name:<26} {m['decode_tokens_per_s'] or 0:7.2f} tok/s  "
                    f"floor ratio {m.get('decode_floor_ratio') or float('nan'):.2f}  {verdict}"
                )
    click.echo(
        "\ncache  strategy                    tok/s  floor_ratio  run reads MB/s  recall                       backend"
    )
    for (share, name), runs in cells.items():
        tps = statistics.median(r["metrics"]["decode_tokens_per_s"] or 0 for r in runs)
        ratios = [r["metrics"].get("decode_floor_ratio") for r in runs]
        ratio = statistics.median(ratios) if None not in ratios else None
        io = runs[-1]["metrics"].get("expert_io") or {}
        read_bw = statistics.median(r["metrics"].get("expert_read_throughput_bytes_per_s") or 0 for r in runs)
        click.echo(
            f"{share:>5}  {name:<26} {tps:7.2f}  {'n/a' if ratio is None else f'{ratio:11.2f}':>11}  "
            f"{read_bw / 1e6:14.0f}  {recall_of(runs[-1]):<28} {io.get('backend')} qd {io.get('queue_depth')}"
        )
        floor = runs[-1]["metrics"].get("decode_floor") or {}
        if floor.get("floor_s_per_token") is None:
            click.echo(f"       floor unavailable: compute {floor.get('compute_source')}; io {floor.get('io_source')}")

    assert experts_file is not None
    index = PackIndex.load(pack_paths(Path(model))["index"])
    depth, how = queue_depth_from_profile(load_profile_for_path(experts_file), index.stride_bytes, 4)
    click.echo(f"\nexpert reads of {index.stride_bytes} B at queue depth {depth} ({how}) on {experts_file}")
    if fio_path() is None:
        click.echo("fio is not installed (apt-get install -y fio): runtime throughput only")
    job = JobSpec("randread", index.stride_bytes, depth, True, read_seconds, 1.0, 1)
    size = experts_file.stat().st_size
    for round_ in range(rounds):
        ours = runtime_read_bytes_per_s(experts_file, index, depth, read_seconds, round_)
        line = f"round {round_}: runtime {ours / 1e6:8.0f} MB/s"
        if fio_path() is not None:
            cmd = fio_command(job, str(experts_file), size, ioengine="io_uring", readonly=True, seed=round_)
            _, fio = run_fio(cmd, job)
            line += f"   fio {fio.bw_bytes_per_s / 1e6:8.0f} MB/s   runtime/fio {ours / fio.bw_bytes_per_s:.3f}"
        click.echo(line)


if __name__ == "__main__":
    main()
