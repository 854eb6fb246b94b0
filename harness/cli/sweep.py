"""`harness sweep` (matrix of cells, one subprocess each, resumable) and `harness report` (HTML + PNG)."""

from __future__ import annotations

import shlex
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from harness.errors import HarnessError
from harness.sweep import DEFAULT_CELL_COMMAND, Cell, CellOutcome, SweepRunner, expand, load_sweep, parse_only, select


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
def sweep(
    spec_file: Path,
    results: Path | None,
    dry_run: bool,
    force: bool,
    only: tuple[str, ...],
    cell_command: str | None,
    cluster: str | None,
) -> None:
    """Run every cell of SPEC_FILE (base x matrix - exclude, x repeats) in its own process."""
    spec = load_sweep(spec_file)
    results = results or Path("results") / (spec.name or spec_file.stem)
    cells = select(expand(spec), parse_only(only))
    command = shlex.split(cell_command) if cell_command else DEFAULT_CELL_COMMAND
    console = Console(stderr=False)
    if dry_run:
        runner = SweepRunner(spec, results, command=command, force=force)
        table = Table("#", "run_id", "status", "cell", title=f"sweep {spec.name}: {len(cells)} cell(s) -> {results}")
        for cell, status in runner.plan(cells):
            shown = "[yellow]will rerun[/]" if status and force else status or "to run"
            table.add_row(str(cell.position), cell.run_id, shown, cell.label())
        console.print(table)
        return
    progress = _RichProgress(console)
    executor = None
    if cluster is not None:
        from harness.cluster.sweep import RayCells

        executor = RayCells(cluster)
    runner = SweepRunner(spec, results, command=command, force=force, progress=progress, executor=executor)
    with progress.bar:
        outcomes = runner.run(cells)
    failed = [o for o in outcomes if o.status == "failed"]
    ran = [o for o in outcomes if o.status != "skipped"]
    console.print(f"sweep {spec.name}: {len(ran)} run, {len(failed)} failed, results in {results}")


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
