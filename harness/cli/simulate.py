"""CLI of trace replay: `simulate`, `trace import|info`, `policy train|list`. Parses, delegates, prints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import click
from click.core import ParameterSource
from rich.table import Table

from harness.cli.console import make_console
from harness.cli.output import echo_json
from harness.paths import check_output_dir, check_output_file
from harness.units import format_bytes, parse_size

if TYPE_CHECKING:
    from harness.trace.simulate import SimulationRun

_console = make_console()


@click.command("simulate")
@click.option("--trace", "trace_path", required=True, type=click.Path(path_type=Path), help="Trace Parquet file.")
@click.option(
    "--policy",
    "policies",
    default="lru,lfu",
    show_default=True,
    help="Comma-separated policies (`harness policy list`; e.g. lru, lfu, lfu-window:W, fwlru:W, lrfu:LAMBDA, "
    "s3fifo, sieve, least-stale, layer-lru, arc, lecar, random, static:TRACE, flashmoe:MODEL); Belady, "
    "Belady-bypass and the static-frequency oracle are always added as bounds.",
)
@click.option(
    "--capacity",
    default="12.5%,25%,50%",
    show_default=True,
    help="Slots per cache group: percentages of its experts, slot counts, or a range such as 10%:90%:10%.",
)
@click.option("--scope", type=click.Choice(["per-layer", "global"]), default="per-layer", show_default=True)
@click.option(
    "--phase",
    type=click.Choice(["all", "prefill", "decode"]),
    default="all",
    show_default=True,
    help="Which steps are replayed (the others are skipped entirely).",
)
@click.option(
    "--reset",
    type=click.Choice(["never", "per-sequence"]),
    default="never",
    show_default=True,
    help="never: one cache over the whole trace (as a live run); per-sequence: a fresh cache per sequence.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of randomised policies (random, lecar).")
@click.option("--expert-bytes", default=None, help="Size of one expert (e.g. 3MiB), overriding the trace's.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Folder for CSV, Parquet, PNG and JSON.")
@click.option(
    "--split",
    default=None,
    help="Held-out protocol: seq:N (the first N sequences) or frac:F (the first F share of the token steps) "
    "profile/train; every policy is scored on the rest only.",
)
@click.option(
    "--cluster", default=None, metavar="ADDRESS|auto", help="Replay the cells as Ray tasks (needs harness[cluster])."
)
@click.option(
    "--tiers",
    "tier_stacks",
    multiple=True,
    help="Replay through a tier stack instead of --policy/--capacity, top to bottom, e.g. "
    "device:lru:48,host:lfu:256,pagecache:4096 (pagecache is an LRU model); repeat to compare stacks.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary and result rows as JSON instead of tables.")
def simulate_cmd(
    trace_path: Path,
    policies: str,
    capacity: str,
    scope: str,
    phase: str,
    reset: str,
    seed: int,
    expert_bytes: str | None,
    out: Path | None,
    split: str | None,
    cluster: str | None,
    tier_stacks: tuple[str, ...],
    as_json: bool,
) -> None:
    """Replay a routing trace through cache policies; hit rates beside the Belady bounds."""
    if out is not None:
        check_output_dir(out, "--out")
    if tier_stacks:
        _simulate_tiers(tier_stacks, trace_path, scope, phase, reset, seed, expert_bytes, out)
        return
    from harness.trace.sim_output import result_rows, summary, write_outputs
    from harness.trace.simulate import run_simulation

    grid = None
    if cluster is not None:
        from harness.cluster.simulate import ray_grid

        grid = ray_grid(cluster)

    run = run_simulation(
        trace_path,
        policies.split(","),
        capacity,
        scope,  # type: ignore[arg-type]
        phase,  # type: ignore[arg-type]
        reset,  # type: ignore[arg-type]
        seed,
        None if expert_bytes is None else parse_size(expert_bytes),
        split,
        grid,
    )
    written = write_outputs(run, out) if out is not None else []
    if as_json:
        echo_json({**summary(run), "results": result_rows(run), "written": written})
        return
    _print_run(run)
    for path in written:
        _console.print(f"wrote {path}")


def _print_run(run: SimulationRun) -> None:
    capacities = sorted({r.capacity_slots for r in run.results})
    policies = list(dict.fromkeys(r.policy for r in run.results))
    by = {(r.policy, r.capacity_slots): r for r in run.results}
    whole = run.meta.num_experts * (len(run.meta.moe_layers) if run.scope == "global" else 1)
    heading = f"{run.meta.model}: scope {run.scope}, phase {run.phase}, reset {run.reset}, sequences {run.seq_ids}"
    if run.split is not None:
        heading += f", held-out part of split {run.split}"
    table = Table(title=f"hit rate ({heading})")
    table.add_column("policy")
    for c in capacities:
        table.add_column(f"{c} slots ({100 * c / whole:.1f}%)", justify="right")
    for p in policies:
        table.add_row(_label(p), *(f"{by[p, c].hit_rate:.4f}" for c in capacities))
    _console.print(table)
    per_token = Table(title="expert bytes read per token (misses per token where the expert size is unknown)")
    per_token.add_column("policy")
    for c in capacities:
        per_token.add_column(f"{c} slots", justify="right")
    for p in policies:
        cells = []
        for c in capacities:
            value = by[p, c].bytes_read_per_token()
            cells.append(format_bytes(value) if value is not None else f"{by[p, c].misses_per_token():.2f} misses")
        per_token.add_row(_label(p), *cells)
    _console.print(per_token)
    layers = list(run.meta.moe_layers)
    per_layer = Table(title="hit rate per layer")
    per_layer.add_column("policy")
    per_layer.add_column("slots", justify="right")
    for layer in layers:
        per_layer.add_column(f"L{layer}", justify="right")
    for p in policies:
        for c in capacities:
            per_layer.add_row(_label(p), str(c), *(f"{by[p, c].total(layer=layer).hit_rate:.3f}" for layer in layers))
    _console.print(per_layer)
    for note in run.notes:
        _console.print(f"note: {note}")


def _simulate_tiers(
    stacks: tuple[str, ...],
    trace_path: Path,
    scope: str,
    phase: str,
    reset: str,
    seed: int,
    expert_bytes: str | None,
    out: Path | None,
) -> None:
    """`simulate --tiers`: each stack over the trace, one table row per tier."""
    from harness.errors import HarnessError
    from harness.trace.simulate_tiers import run_tier_simulation, write_tier_outputs

    context = click.get_current_context()
    options = {"policies": "--policy", "capacity": "--capacity", "split": "--split", "cluster": "--cluster"}
    given = [o for n, o in options.items() if context.get_parameter_source(n) is ParameterSource.COMMANDLINE]
    if given:
        raise HarnessError(f"--tiers sets each tier's policy and size, over all steps: drop {', '.join(given)}")
    run = run_tier_simulation(
        trace_path,
        stacks,
        scope,  # type: ignore[arg-type]
        phase,  # type: ignore[arg-type]
        reset,  # type: ignore[arg-type]
        seed,
        None if expert_bytes is None else parse_size(expert_bytes),
    )
    _console.print(f"{run.meta.model}: scope {run.scope}, phase {run.phase}, reset {run.reset}, seqs {run.seq_ids}")
    for result in run.results:
        table = Table(title=f"hits per tier: {result.label}")
        for name in ("tier", "hits", "misses", "hit rate", "served", "misses from", "bytes/token"):
            table.add_column(name, justify="left" if name in ("tier", "misses from") else "right")
        for row in result.rows():
            per_token = row["edge_bytes_per_token"]
            table.add_row(
                f"{row['kind']}:{row['policy']}:{row['capacity_slots']}" + (" (model)" if row["modelled"] else ""),
                str(row["hits"]),
                str(row["misses"]),
                f"{row['hit_rate']:.4f}",
                f"{row['served_share']:.4f}",
                str(row["edge_below"]).split("->")[0],
                "-" if per_token is None else format_bytes(per_token),  # type: ignore[arg-type]
            )
        _console.print(table)
    _console.print("hit rate: of the tier's accesses (the misses of the tier above); served: share of all accesses")
    _console.print("bytes/token: expert bytes the tier's misses bring up from the level below, per token row")
    for note in run.notes:
        _console.print(f"note: {note}")
    if out is not None:
        for path in write_tier_outputs(run, out):
            _console.print(f"wrote {path}")


def _label(spec: str) -> str:
    """A policy spec for a table cell: a model path argument is shortened to its file name; bounds say so."""
    from harness.trace.simulate import ORACLES

    name, _, argument = spec.partition(":")
    label = f"{name}:{Path(argument).name}" if "/" in argument else spec
    return f"{label} (bound)" if spec in ORACLES else label


@click.group("trace")
def trace_group() -> None:
    """Routing traces: import public formats, export to libCacheSim, describe a trace."""


@trace_group.command("import")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["flame", "vllm-jsonl", "route-jsonl", "vllm-routed", "prompt-csv", "megatron-jsonl"]),
    required=True,
    help="flame (.pt/.csv per layer), vllm-jsonl (MoE-logger), route-jsonl (route simulators), vllm-routed "
    "(.npy/.npz [tokens, moe_layers, top_k]), prompt-csv (files or folders), megatron-jsonl (router_trace_rank*).",
)
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Trace Parquet file to write.")
@click.option(
    "--sequence-length", type=click.IntRange(1), default=None, help="flame: tokens per sequence (default: the file's)."
)
@click.option(
    "--num-experts", type=click.IntRange(1), default=None, help="Experts per layer (default: inferred; not vllm-jsonl)."
)
@click.option("--expert-bytes", default="0", show_default=True, help="Size of one expert, if known (e.g. 3MiB).")
def trace_import(
    fmt: str,
    files: tuple[Path, ...],
    out: Path,
    sequence_length: int | None,
    num_experts: int | None,
    expert_bytes: str,
) -> None:
    """Import a public routing-trace format into one harness trace (format in the README, "Routing traces")."""
    from harness.errors import HarnessError
    from harness.trace.importers import import_trace

    check_output_file(out, "--out")
    options: dict[str, object] = {"expert_bytes": parse_size(expert_bytes)}
    if fmt == "flame":
        options.update(sequence_length=sequence_length, num_experts=num_experts)
    elif sequence_length is not None:
        raise HarnessError("--sequence-length applies to --format flame only")
    elif fmt == "vllm-jsonl" and num_experts is not None:
        raise HarnessError("--num-experts does not apply to vllm-jsonl (its meta line gives num_experts)")
    elif num_experts is not None:
        options["num_experts"] = num_experts
    report = import_trace(fmt, list(files), out, **options)
    _console.print(
        f"wrote {out}: {report.rows} token rows, {report.sequences} sequences, layers {report.layers}"
        + (f"; dropped {report.dropped_warmup_rows} warm-up rows (all layers)" if fmt == "vllm-jsonl" else "")
    )
    for note in report.notes:
        _console.print(f"note: {note}")


@trace_group.command("export")
@click.argument("trace_path", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["libcachesim-csv", "oraclegeneral"]), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Request-stream file to write.")
@click.option(
    "--layer",
    type=int,
    default=None,
    help="Only this MoE layer's accesses (its own cache in per-layer scope); default all layers (global scope).",
)
@click.option("--phase", type=click.Choice(["all", "prefill", "decode"]), default="all", show_default=True)
def trace_export(trace_path: Path, fmt: str, out: Path, layer: int | None, phase: str) -> None:
    """Write a trace as libCacheSim requests: one per access, in the harness's replay order."""
    from harness.trace.export import export_libcachesim
    from harness.trace.schema import read_trace

    report = export_libcachesim(read_trace(trace_path), out, fmt, layer, phase)  # type: ignore[arg-type]
    _console.print(
        f"wrote {out}: {report.requests} requests to {report.objects} objects (layer x num_experts + expert), "
        f"layers {report.layers}, object size 1 (libCacheSim cache sizes are slots)"
    )


@trace_group.command("info")
@click.argument("trace_path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON instead of tables.")
def trace_info_cmd(trace_path: Path, as_json: bool) -> None:
    """Shape, phases, per-layer popularity skew and reuse distances of a trace."""
    from harness.trace.info import trace_info
    from harness.trace.schema import read_trace

    info = trace_info(read_trace(trace_path))
    if as_json:
        echo_json(info)
        return
    _console.print(f"model {info.model}; source: {info.source}")
    _console.print(
        f"{info.sequences} sequences, {info.rows} token rows, {info.steps} steps; layers {info.layers}; "
        f"{info.num_experts} experts, top-{info.top_k}; expert size "
        + (format_bytes(info.expert_bytes) if info.expert_bytes else "unknown")
    )
    _console.print("rows per phase: " + ", ".join(f"{k} {v}" for k, v in info.rows_per_phase.items()))
    table = Table(title="per layer (accesses de-duplicated within a step)")
    for name in ("layer", "accesses", "experts used", "top-10% share", "consecutive overlap", "reuse p50", "reuse p90"):
        table.add_column(name, justify="right")
    for s in info.per_layer:
        table.add_row(
            str(s.layer),
            str(s.accesses),
            str(s.experts_used),
            f"{s.top10_share:.3f}",
            f"{s.consecutive_overlap:.3f}",
            "-" if math.isnan(s.reuse_p50_steps) else f"{s.reuse_p50_steps:.0f}",
            "-" if math.isnan(s.reuse_p90_steps) else f"{s.reuse_p90_steps:.0f}",
        )
    _console.print(table)
    _console.print("reuse distances in token steps between two uses of an expert in a layer")


@click.group("policy")
def policy_group() -> None:
    """Cache policies: list them, train the FlashMoE learned policy."""


@policy_group.command("list")
def policy_list() -> None:
    """Registered policy names."""
    from harness.cache.registry import policy_class, policy_names

    for name in policy_names():
        cls = policy_class(name)
        _console.print(f"{name}{'  (simulation only: reads the future)' if cls.needs_future else ''}")


@policy_group.command("train")
@click.option("--trace", "trace_path", required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Model file to write (e.g. flash.pt).")
@click.option("--capacity", default="12.5%,25%,50%", show_default=True, help="Capacities of the held-out evaluation.")
@click.option("--seed", default=0, show_default=True)
@click.option("--phase", type=click.Choice(["all", "prefill", "decode"]), default="decode", show_default=True)
@click.option("--max-epochs", default=200, show_default=True, type=click.IntRange(1))
@click.option(
    "--heldout-fraction",
    default=0.25,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Share of sequences never trained on.",
)
@click.option(
    "--split",
    default=None,
    help="Held-out protocol as in `simulate --split` (seq:N or frac:F); default: the last --heldout-fraction of "
    "the sequences, or of the token steps for a single-stream trace.",
)
def policy_train(
    trace_path: Path,
    out: Path,
    capacity: str,
    seed: int,
    phase: str,
    max_epochs: int,
    heldout_fraction: float,
    split: str | None,
) -> None:
    """Train FlashMoE per-layer networks on Belady labels; report held-out hit rates beside LRU, LFU, Belady."""
    from harness.cache.learned import TrainSettings
    from harness.trace.train import train_flashmoe

    check_output_file(out, "--out")
    settings = TrainSettings(seed=seed, max_epochs=max_epochs, heldout_fraction=heldout_fraction)
    report = train_flashmoe(trace_path, out, capacity, seed, phase, settings, split)  # type: ignore[arg-type]
    _console.print(
        f"wrote {report.model_path}: split {report.split}, trained on sequences {report.train_sequences}, "
        f"evaluated on the held-out part (sequences {report.heldout_sequences}) only"
    )
    table = Table(title="held-out hit rate (per-layer scope, fresh cache per sequence)")
    table.add_column("policy")
    capacities = sorted({int(r["capacity_slots"]) for r in report.rows})  # type: ignore[call-overload]
    for c in capacities:
        table.add_column(f"{c} slots", justify="right")
    for policy in dict.fromkeys(str(r["policy"]) for r in report.rows):
        rates = {r["capacity_slots"]: r["hit_rate"] for r in report.rows if r["policy"] == policy}
        table.add_row(policy, *(f"{rates[c]:.4f}" for c in capacities))
    _console.print(table)


commands: list[click.Command] = [simulate_cmd, trace_group, policy_group]
