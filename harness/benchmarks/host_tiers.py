"""Benchmark: the host tier three ways at each RAM budget: the harness's own RAM slots read with O_DIRECT, the
kernel's page cache (buffered reads), and slots over the page cache (issue 12; llama.cpp PR #25294 vs #26003).

    python -m harness.benchmarks.host_tiers --model models/olmoe-small --budgets 1.25GiB,1.5GiB,2GiB \\
        [--rounds 2] [--ssd DIR] [--prompts 2] [--max-new-tokens 40] [--results results/host-tiers-bench] [--json]

Each (round, budget, design) cell is one `harness run` in its own process under its budget, run as a sweep
runs a cell (`harness.sweep.run_one_cell`: the page cache dropped first, the budget's cgroup where the machine
has one), in rounds, odd rounds reversed (`harness.sweep.interleave`), so a drift of the machine spreads over
every design. A cell with a result already in `--results` is not run again. The table gives per budget and
design the mean over rounds of decode tokens/s, of each tier's decode hit rate and of the SSD bytes per decode
token, and for the page cache its live hit rate (reads classified as page cache or device) beside the
simulator's LRU model of it, with the difference. Capacities come from `designs` (same rule as
workloads/sweeps/hierarchy.yaml). Run it on a quiet machine with a cgroup v2 memory controller: without one the
budget is accounting-only and the page cache is not held to it.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from harness.errors import ExitCode, HarnessError
from harness.spec import RunSpec
from harness.store.layout import PackIndex
from harness.units import format_bytes, parse_size

RUNTIME_RSS_BYTES = 520 << 20
"""The sizing of the shipped hierarchy.yaml (and the tests); the benchmark itself measures it
(`cell_runtime_bytes`). Resident memory of a run besides the non-expert weights, slots and workspace:
interpreter, torch, transformers, numba and the compiled policy kernels, engine. Measured on the 2-core VM:
`import harness.run` holds 515 MiB (torch 220, transformers 115, numba 50, the policy kernels 52), and a
cell's own budget check found 1280 - 374 - 129.6 - 256 = 520 MiB at a 1.25 GiB budget."""
SLACK_BYTES = 32 << 20
"""Kept free besides: the KV cache (3 MiB for olmoe-small at 2 prompts x 40 tokens) and room for a baseline
a few MiB above the measured one, so each design fits the run's own budget check."""
DESIGNS = ("O_DIRECT slots", "page cache", "slots over page cache")
"""The three host-tier designs, in table order."""


@dataclass(frozen=True)
class Design:
    """One host-tier design at one budget: its tier stack and the read path it needs."""

    name: str
    tiers: str
    io_engine: str


def expert_ram_bytes(
    budget_bytes: int, index: PackIndex, io_threads: int = 4, runtime_bytes: int = RUNTIME_RSS_BYTES
) -> int:
    """RAM of a budget left for expert tiers: what the run's own budget check leaves (`expert_ram_free`), less
    the read buffers (one expert per read thread) and the slack."""
    from harness.run import expert_ram_free  # the run's own rule (imports the engine: torch)

    free = expert_ram_free(budget_bytes, runtime_bytes, index.dense_bytes)
    return free - io_threads * index.stride_bytes - SLACK_BYTES


def designs(
    budget_bytes: int, index: PackIndex, io_threads: int = 4, runtime_bytes: int = RUNTIME_RSS_BYTES
) -> list[Design]:
    """The three designs at one budget, each holding the same expert bytes in RAM.

    S = the slots per layer that fit (expert RAM // (MoE layers x expert stride), at most the experts of a
    layer); slots only: host:lru:S
    (O_DIRECT); page cache only: pagecache:S x layers (buffered); slots over the page cache: H = max(top_k, S // 2)
    slots per layer and the page cache the rest, (S - H) x layers (buffered; tiers are not exclusive, so the
    page cache also holds what the slots hold, and both count against the budget). The last design is left
    out where S - H is 0."""
    layers = len(index.moe_layers)
    fits = expert_ram_bytes(budget_bytes, index, io_threads, runtime_bytes) // (layers * index.stride_bytes)
    per_layer = min(fits, index.num_experts)  # a budget that holds every expert: each design holds them all
    if per_layer < index.top_k:
        raise HarnessError(
            f"RAM budget {format_bytes(budget_bytes)} leaves {max(per_layer, 0)} expert slots per layer, fewer than "
            f"the model's top-{index.top_k}: give a larger budget"
        )
    host = max(index.top_k, per_layer // 2)
    out = [
        Design(DESIGNS[0], f"host:lru:{per_layer}", "direct"),
        Design(DESIGNS[1], f"pagecache:{per_layer * layers}", "buffered"),
    ]
    if per_layer > host:
        out.append(Design(DESIGNS[2], f"host:lru:{host},pagecache:{(per_layer - host) * layers}", "buffered"))
    return out


@dataclass
class TableRow:
    """One budget x design: means over its ok runs (None where no run has the figure)."""

    budget_bytes: int
    design: str
    tiers: str
    runs: int
    tokens_per_s: float | None
    tokens_per_s_by_round: list[float]
    tier_hit_rate_decode: dict[str, float | None]
    """By tier kind, top first."""
    ssd_read_bytes_per_token: float | None
    pagecache_model_hit_rate: float | None
    pagecache_live_hit_rate: float | None
    pagecache_model_minus_live: float | None
    invalid: int = 0
    failures: list[str] = field(default_factory=list)


def _mean(values: list[Any]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return statistics.fmean(present) if present else None


def table(cells: list[tuple[int, Design, dict[str, Any]]]) -> list[TableRow]:
    """Rows of the table from (budget, design, result document) of every cell, in budget then DESIGNS order.

    Ok runs count (INVALID ones too, counted apart: the table is for a quiet machine, the report ranks); a
    failed run adds its error to `failures`."""
    groups: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for budget, design, result in cells:
        groups.setdefault((budget, design.name, design.tiers), []).append(result)
    rows = []
    for (budget, name, tiers), results in sorted(groups.items(), key=lambda g: (g[0][0], DESIGNS.index(g[0][1]))):
        ok = [r for r in results if r.get("status") == "ok"]
        metrics = [r.get("metrics") or {} for r in ok]
        tier_rows = [m.get("tiers") or [] for m in metrics]
        kinds = [str(t["kind"]) for t in tier_rows[0]] if tier_rows else []
        pagecache = [t for rows_ in tier_rows for t in rows_ if t.get("modelled")]
        rows.append(
            TableRow(
                budget_bytes=budget,
                design=name,
                tiers=tiers,
                runs=len(ok),
                tokens_per_s=_mean([m.get("decode_tokens_per_s") for m in metrics]),
                tokens_per_s_by_round=[
                    float(m["decode_tokens_per_s"]) for m in metrics if m.get("decode_tokens_per_s") is not None
                ],
                tier_hit_rate_decode={
                    kind: _mean([t.get("hit_rate_decode") for rows_ in tier_rows for t in rows_ if t["kind"] == kind])
                    for kind in kinds
                },
                ssd_read_bytes_per_token=_mean([m.get("ssd_read_bytes_per_token") for m in metrics]),
                pagecache_model_hit_rate=_mean([t.get("hit_rate") for t in pagecache]),
                pagecache_live_hit_rate=_mean([t.get("live_hit_rate") for t in pagecache]),
                pagecache_model_minus_live=_mean([t.get("model_minus_live_hit_rate") for t in pagecache]),
                invalid=sum((r.get("validity") or {}).get("valid") is False for r in ok),
                failures=[str(r.get("error") or "failed") for r in results if r.get("status") != "ok"],
            )
        )
    return rows


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(rows: list[TableRow]) -> str:
    """The table as text, one line per budget x design (failures listed under it)."""
    head = (
        f"{'budget':>9}  {'design':<22} {'tiers':<28} {'runs':<13} {'tok/s':>7}  {'decode hit rate per tier':<28} "
        f"{'SSD MB/tok':>10}  {'pagecache model/live/diff':<25}"
    )
    lines = [head]
    for r in rows:
        hits = " ".join(f"{kind} {_num(rate)}" for kind, rate in r.tier_hit_rate_decode.items()) or "-"
        ssd = "-" if r.ssd_read_bytes_per_token is None else f"{r.ssd_read_bytes_per_token / 1e6:.1f}"
        page = (
            "-"
            if r.pagecache_model_hit_rate is None and r.pagecache_live_hit_rate is None
            else f"{_num(r.pagecache_model_hit_rate)}/{_num(r.pagecache_live_hit_rate)}/"
            f"{_num(r.pagecache_model_minus_live)}"
        )
        runs = f"{r.runs}" + (f" ({r.invalid} INVALID)" if r.invalid else "")
        lines.append(
            f"{format_bytes(r.budget_bytes):>9}  {r.design:<22} {r.tiers:<28} {runs:<13} {_num(r.tokens_per_s, 2):>7}  "
            f"{hits:<28} {ssd:>10}  {page:<25}"
        )
        lines.extend(f"{'':>11}failed: {reason}" for reason in r.failures)
    return "\n".join(lines)


def cell_runtime_bytes() -> int:
    """A cell's runtime as its budget check measures it (`harness.run.preflight`: this process's resident memory
    once the run's modules are imported), measured here the same way, so the designs fit on this machine."""
    import psutil

    import harness.run  # noqa: F401 - what a cell holds before its weights load

    return psutil.Process().memory_info().rss


def plan_cells(
    model: str,
    budgets: list[str],
    index: PackIndex,
    rounds: int,
    base: dict[str, Any],
    runtime_bytes: int = RUNTIME_RSS_BYTES,
) -> list[tuple[int, int, Design, RunSpec]]:
    """(round, budget bytes, design, spec) of every cell in run order, sized for a cell runtime of
    `runtime_bytes`; a budget too small or a spec the harness refuses fails here, before anything runs."""
    from harness.sweep import interleave

    threads = base.get("io_threads", 4)
    configs = [
        (text, design) for text in budgets for design in designs(parse_size(text), index, threads, runtime_bytes)
    ]
    cells = []
    for rnd, (text, design) in interleave(configs, rounds):
        spec = RunSpec(
            model=model,
            ram_budget=text,
            tiers=design.tiers,
            io_engine=design.io_engine,  # type: ignore[arg-type]
            repeat=rnd,
            **base,
        )
        cells.append((rnd, parse_size(text), design, spec))
    return cells


def _budgets(text: str) -> list[str]:
    budgets = [part.strip() for part in text.split(",") if part.strip()]
    for budget in budgets:
        parse_size(budget)
    if not budgets:
        raise HarnessError("--budgets: give at least one RAM budget, e.g. 1.25GiB,1.5GiB,2GiB")
    return budgets


@click.command()
@click.option("--model", required=True, help="Model folder (packed or packable).")
@click.option("--budgets", default="1.25GiB,1.5GiB,2GiB", show_default=True, help="RAM budgets, comma-separated.")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(min=1), help="Runs of every cell.")
@click.option("--ssd", default=None, help="Folder on the SSD for the expert file (as `harness run --ssd`).")
@click.option("--workload", default="default", show_default=True, help="Prompt set (its first --prompts prompts).")
@click.option("--prompts", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--max-new-tokens", default=40, show_default=True, type=click.IntRange(min=1))
@click.option("--io-threads", default=4, show_default=True, type=click.IntRange(min=1, max=64))
@click.option("--results", type=click.Path(path_type=Path), default=Path("results/host-tiers-bench"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the table's rows as JSON instead of text.")
@click.option("--dry-run", is_flag=True, help="Print the cells in run order (round, budget, tiers, io) and stop.")
def main(
    model: str,
    budgets: str,
    rounds: int,
    ssd: str | None,
    workload: str,
    prompts: int,
    max_new_tokens: int,
    io_threads: int,
    results: Path,
    as_json: bool,
    dry_run: bool,
) -> None:
    """Run the three host-tier designs at each budget, interleaved, and print the table."""
    from harness.models.locate import pack_paths, resolve_model_dir
    from harness.sweep import Cell, prepare_models

    try:
        prepare_models([Cell(0, 0, RunSpec(model=model), {})])  # packs in a child where the pack is stale
        index = PackIndex.load(pack_paths(resolve_model_dir(model))["index"])
        base = {
            "ssd": ssd,
            "workload": workload,
            "max_prompts": prompts,
            "max_new_tokens": max_new_tokens,
            "io_threads": io_threads,
        }
        cells = plan_cells(model, _budgets(budgets), index, rounds, base, cell_runtime_bytes())
    except HarnessError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitCode.BAD_INPUT)
    if dry_run:
        for rnd, budget, design, spec in cells:
            click.echo(
                f"round {rnd}  {format_bytes(budget):>9}  {design.name:<22} {spec.tiers:<28} io {spec.io_engine}"
            )
        return
    done = [(budget, design, _run(spec, results, as_json)) for _, budget, design, spec in cells]
    rows = table(done)
    if as_json:
        click.echo(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        click.echo("\n" + render(rows))


def _run(spec: RunSpec, results: Path, quiet: bool) -> dict[str, Any]:
    """One cell as the sweep runs it (its result kept when it has an ok one); its result document."""
    from harness.sweep import cell_result, run_one_cell

    done = cell_result(results, spec.run_id)
    if done is None or done.status != "ok":
        outcome = run_one_cell(spec, results)
        done = cell_result(results, spec.run_id)
        if not quiet:
            figure = (done.metrics.decode_tokens_per_s if done and done.metrics else None) or 0.0
            click.echo(
                f"round {spec.repeat} {spec.ram_budget:>12} {spec.tiers:<28} {outcome.status:<7} {figure:6.2f} tok/s"
                + (f"  {outcome.reason}" if outcome.reason else ""),
                err=True,
            )
    return done.to_dict() if done is not None else {"status": "failed", "error": "no result"}


if __name__ == "__main__":
    main()
