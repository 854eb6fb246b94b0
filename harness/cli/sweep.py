"""`harness sweep` (matrix of cells, one subprocess each, resumable) and `harness report` (HTML + PNG).

`harness sweep` exits 0 when every cell is ok and valid, 3 when one is INVALID, 4 when one failed,
2 for a bad sweep file, 130 when interrupted; it ends with a table of the cells (or `--json`).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from harness.cli.console import make_console
from harness.errors import HarnessError
from harness.process import sigterm_as_interrupt
from harness.sweep import (
    DEFAULT_CELL_COMMAND,
    Cell,
    CellOutcome,
    SweepRunner,
    expand,
    load_sweep,
    parse_only,
    select,
    sweep_exit_code,
    sweep_summary,
)
from harness.units import format_bytes


class _RichProgress:
    """A progress bar with the cell being run and an ETA, plus one line per finished cell."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.bar.add_task("sweep", total=0)

    def begin(self, to_run: int, already_done: int) -> None:
        if already_done:
            self.console.print(f"{already_done} cell(s) already done, {to_run} to run")
        self.bar.update(self.task, total=to_run)

    def cell_started(self, cell: Cell) -> None:
        self.bar.update(self.task, description=f"{cell.run_id} {cell.label()}")

    def cell_finished(self, outcome: CellOutcome) -> None:
        colour = "green" if outcome.status == "ok" else "red"
        why = f": {outcome.reason}" if outcome.reason else ""
        self.console.print(
            f"[{colour}]{outcome.status}[/] {outcome.cell.run_id} {outcome.cell.label()} "
            f"({outcome.duration_s:.1f} s){why}",
            highlight=False,
        )
        self.bar.advance(self.task)


@click.command("sweep")
@click.argument("spec_file", type=click.Path(path_type=Path))
@click.option(
    "--results",
    type=click.Path(path_type=Path),
    default=None,
    help="Results folder; default: results/<sweep name>.",
)
@click.option("--dry-run", is_flag=True, help="Print the expanded cells and which are done; run nothing.")
@click.option("--force", is_flag=True, help="Run cells again even when they are done.")
@click.option(
    "--retry-failed/--no-retry-failed",
    default=True,
    show_default=True,
    help="On resume, run failed cells again (default); --no-retry-failed keeps their failure.",
)
@click.option("--only", multiple=True, metavar="KEY=VALUE", help="Run only matching cells (repeatable).")
@click.option(
    "--cell-command",
    default=None,
    help="Command of one cell with {spec}, {results}, {run_id}, {python}; default: "
    + shlex.join(["{python}", *DEFAULT_CELL_COMMAND[1:]]),
)
@click.option(
    "--cluster",
    default=None,
    metavar="ADDRESS|auto",
    help="Run the cells on a Ray cluster, each on a node that has its SSD folder (needs harness[cluster]).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary of the cells instead of the table.")
def sweep(
    spec_file: Path,
    results: Path | None,
    dry_run: bool,
    force: bool,
    retry_failed: bool,
    only: tuple[str, ...],
    cell_command: str | None,
    cluster: str | None,
    as_json: bool,
) -> None:
    """Run every cell of SPEC_FILE (base x matrix - exclude, x repeats) in its own process.

    Exit status: 0 every cell ok and valid, 3 a cell INVALID, 4 a cell failed, 2 bad input, 130 interrupted.
    """
    spec = load_sweep(spec_file)
    results = results or Path("results") / (spec.name or spec_file.stem)
    cells = select(expand(spec), parse_only(only))
    command = shlex.split(cell_command) if cell_command else DEFAULT_CELL_COMMAND
    console = make_console(stderr=as_json)
    if dry_run:
        runner = SweepRunner(spec, results, command=command, force=force, retry_failed=retry_failed)
        table = Table("#", "run_id", "status", "cell", title=f"sweep {spec.name}: {len(cells)} cell(s) -> {results}")
        for cell, status in runner.plan(cells):
            shown = "[yellow]will rerun[/]" if status and runner.to_run(status) else status or "to run"
            table.add_row(str(cell.position), cell.run_id, shown, cell.label())
        console.print(table)
        return
    progress = _RichProgress(console)
    executor = None
    if cluster is not None:
        from harness.cluster.sweep import RayCells

        executor = RayCells(cluster)
    runner = SweepRunner(
        spec, results, command=command, force=force, retry_failed=retry_failed, progress=progress, executor=executor
    )
    with sigterm_as_interrupt(), progress.bar:
        outcomes = runner.run(cells)
    if as_json:
        click.echo(json.dumps(sweep_summary(spec.name, results, outcomes)))
    else:
        console.print(_table(spec.name, results, outcomes))
    sys.exit(sweep_exit_code(outcomes))


def _figure(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _table(name: str | None, results: Path, outcomes: list[CellOutcome]) -> Table:
    """One row per cell: status, validity and the key figures."""
    ran = sum(o.ran for o in outcomes)
    failed = sum(o.final_status == "failed" for o in outcomes)
    table = Table(title=f"sweep {name}: {ran} run, {len(outcomes) - ran} already done, {failed} failed -> {results}")
    table.add_column("run_id", no_wrap=True, min_width=16)
    for column in ("cell", "status", "validity", "decode tok/s", "hit rate", "SSD bytes/token"):
        table.add_column(column)
    for o in outcomes:
        m = o.summary
        status = o.final_status if o.ran else f"{o.final_status} (done)"
        valid = {True: "valid", False: "[red]INVALID[/]", None: "-"}[m.get("valid")]
        per_token = m.get("ssd_read_bytes_per_token")
        table.add_row(
            o.cell.run_id,
            o.cell.label(),
            f"[red]{status}[/]" if "failed" in status else status,
            valid,
            _figure(m.get("decode_tokens_per_s"), "{:.2f}"),
            _figure(m.get("hit_rate_decode"), "{:.3f}"),
            "-" if per_token is None else format_bytes(per_token),
        )
    return table


@click.command("report")
@click.argument("results_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder for index.html + PNGs.")
@click.option(
    "--timeline",
    "timeline_runs",
    multiple=True,
    metavar="RUN_ID",
    help="Runs whose telemetry timelines and heat maps to draw (repeatable); default: a few picked automatically.",
)
@click.option("--include-invalid", is_flag=True, help="Rank and plot INVALID runs too (left out by default).")
def report(
    results_dirs: tuple[Path, ...], out_dir: Path, timeline_runs: tuple[str, ...], include_invalid: bool
) -> None:
    """Render index.html, PNG plots and summary.csv from one or more results folders (merged, by machine)."""
    from harness.report import build_report

    for folder in results_dirs:
        if not folder.is_dir():
            raise HarnessError(f"results folder {folder} does not exist")
    index = build_report(list(results_dirs), out_dir, list(timeline_runs), include_invalid)
    click.echo(f"report: {index}")


commands: list[click.Command] = [sweep, report]
