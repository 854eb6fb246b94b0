"""Sweeps: a matrix of run specs expanded into cells, each run in its own process under its RAM budget.

A sweep file (YAML) has a `base` run spec, a `matrix` of lists per RunSpec field, `exclude` rules
and `repeats`. Cells are keyed by run_id, which is content-addressed (spec + the checksums of the
model, tokenizer and prompt file + the machine's fingerprint, harness.identity): a cell is done when
`<results>/<run_id>/result.json` says `ok` or `skipped`, so an interrupted sweep resumes where it
stopped, a cell whose weights or prompt file changed runs again under its new id, and results of two
machines never share a folder. Failed cells run again on resume unless `retry_failed` is off. A cell
that crashes, is killed or times out is recorded as failed (exit status, reason, the tail of its
stderr) and the sweep goes on. Every cell is a child that dies with the sweep (PR_SET_PDEATHSIG), run
under the cell folder's lock.

Layout of a results folder:

    <results>/sweep.json              the sweep spec and cell order (rewritten at each start)
    <results>/<run_id>/spec.json      the cell's RunSpec, given to the cell command
    <results>/<run_id>/result.json    written by `harness run` (or by the sweep for a failed cell)
    <results>/<run_id>/sweep.json     how the sweep ran the cell: exit status, budget mode, cgroup counters
    <results>/<run_id>/stdout.log, stderr.log
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from harness.budget import OOM_REASON, CellCgroup, drop_page_cache, kill_reason
from harness.errors import ExitCode, HarnessError
from harness.identity import local_model_dir, pack_looks_current, run_identity
from harness.process import BUDGET_CHILD_ENV, RunClaimed, child_preexec, claim_run_dir, lock_held_env, start_child
from harness.result_model import RunResult, load_result, summary_row
from harness.results import Validity, environment, write_json_atomic
from harness.spec import RunSpec, load_run_spec
from harness.units import parse_duration, parse_size

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
SPEC_FILE = "spec.json"
CELL_RECORD_FILE = "sweep.json"
DEFAULT_CELL_COMMAND = (sys.executable, "-m", "harness", "run", "--spec", "{spec}", "--results", "{results}")
# The part of a failed cell's stderr kept in its result: enough for a traceback's last frames.
_STDERR_TAIL_LINES = 40
_STDERR_TAIL_CHARS = 6000
# The last stderr line quoted in a failure reason, cut to stay one readable line.
_REASON_CHARS = 300
# How long an interrupted cell gets to exit after SIGINT before it is killed (seconds).
_INTERRUPT_GRACE_S = 10.0
# Fields a sweep may set: the whole RunSpec except the repetition index, which `repeats` owns.
SPEC_FIELDS = tuple(name for name in RunSpec.model_fields if name != "repeat")
T = TypeVar("T")


def _check_keys(where: str, keys: Sequence[str]) -> None:
    for key in keys:
        if key not in SPEC_FIELDS:
            raise ValueError(f"unknown run-spec key {key!r} in {where} (known: {', '.join(SPEC_FIELDS)})")


class SweepSpec(BaseModel):
    """A sweep file: which cells to run (base x matrix - exclude) and how often."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="Name of the sweep; default: the file's stem.")
    description: str | None = Field(None, description="What the sweep is for.")
    base: dict[str, Any] = Field(default_factory=dict, description="Run-spec fields shared by every cell.")
    matrix: dict[str, list[Any]] = Field(
        default_factory=dict, description="Run-spec field -> list of values; cells are the product."
    )
    exclude: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Partial run specs; a cell matching every key of a rule is dropped (a list value: any of).",
    )
    repeats: int = Field(1, ge=1, description="Runs of every configuration, interleaved in rounds.")
    cell_timeout: str | None = Field(None, description="Wall-clock limit of one cell (e.g. 30min); none by default.")
    drop_caches: bool = Field(True, description="Drop the page cache before every cell.")

    @field_validator("base")
    @classmethod
    def _base_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_keys("base", list(value))
        return value

    @field_validator("matrix")
    @classmethod
    def _matrix_keys(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        _check_keys("matrix", list(value))
        for key, values in value.items():
            if not values:
                raise ValueError(f"matrix.{key} is an empty list")
            seen = [_norm(key, v) for v in values]
            if len(set(seen)) != len(seen):
                raise ValueError(f"matrix.{key} lists a value twice")
        return value

    @field_validator("exclude")
    @classmethod
    def _exclude_keys(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, rule in enumerate(value):
            _check_keys(f"exclude[{i}]", list(rule))
        return value

    @field_validator("cell_timeout")
    @classmethod
    def _timeout(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_duration(value)
            except HarnessError as exc:
                raise ValueError(str(exc)) from None
        return value

    @property
    def cell_timeout_s(self) -> float | None:
        return None if self.cell_timeout is None else parse_duration(self.cell_timeout)


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file; one-line HarnessError naming the key for anything wrong."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise HarnessError(f"cannot read sweep file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise HarnessError(f"sweep file {path} is not UTF-8 text, so not a YAML sweep file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise HarnessError(f"sweep file {path}{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise HarnessError(f"sweep file {path} must be a mapping with base, matrix, exclude, repeats")
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "sweep"
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            known = ", ".join(SweepSpec.model_fields)
            msg = f"unknown key (known: {known})"
        raise HarnessError(f"sweep file {path}: {where}: {msg}") from None
    if spec.name is None:
        spec = spec.model_copy(update={"name": path.stem})
    overlap = set(spec.base) & set(spec.matrix)
    if overlap:
        raise HarnessError(f"sweep file {path}: {sorted(overlap)[0]} is in both base and matrix; keep it in one")
    return spec


def _norm(key: str, value: Any) -> str:
    """A value as compared by exclude rules and --only filters: sizes in bytes, booleans in lower case."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if key == "ram_budget":
        try:
            return str(parse_size(value))
        except HarnessError:
            return str(value)
    return str(value)


def _matches(spec: dict[str, Any], rule: dict[str, Any]) -> bool:
    """True when every key of `rule` matches `spec`; a list in the rule means any of its values."""
    for key, wanted in rule.items():
        options = wanted if isinstance(wanted, list) else [wanted]
        if _norm(key, spec.get(key)) not in {_norm(key, o) for o in options}:
            return False
    return True


@dataclass(frozen=True)
class Cell:
    """One run of the sweep: its spec, its position in run order, and the matrix values that make it."""

    position: int
    round: int
    spec: RunSpec
    config: dict[str, Any]

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    def label(self) -> str:
        values = " ".join(f"{k}={v}" for k, v in self.config.items())
        return f"{values} #{self.round}" if self.round else values


def expand(sweep: SweepSpec) -> list[Cell]:
    """All cells in run order: rounds of every configuration, odd rounds reversed.

    Interleaving repeats in rounds spreads each configuration over the sweep's duration, so a disk
    whose speed drifts over minutes does not bias one configuration. Reversing odd rounds gives
    every configuration the same mean position over two rounds (linear drift cancels).
    """
    keys = list(sweep.matrix)
    configs: list[tuple[dict[str, Any], RunSpec]] = []
    used_rules: set[int] = set()
    for values in itertools.product(*(sweep.matrix[k] for k in keys)):
        config = dict(zip(keys, values, strict=True))
        written = {**sweep.base, **config}
        # Rules are matched on the cell as written first, so that a rule can drop a combination the run spec
        # refuses (a page-cache tier with O_DIRECT reads); then on the validated spec (defaults filled in).
        hits = [i for i, rule in enumerate(sweep.exclude) if _matches(written, rule)]
        if not hits:
            try:
                spec = load_run_spec(written)
            except HarnessError as exc:
                label = " ".join(f"{k}={v}" for k, v in config.items()) or "base"
                raise HarnessError(f"sweep {sweep.name}: cell {label}: {exc}") from None
            dumped = spec.model_dump()
            hits = [i for i, rule in enumerate(sweep.exclude) if _matches(dumped, rule)]
        used_rules.update(hits)
        if not hits:
            configs.append((config, spec))
    for i in set(range(len(sweep.exclude))) - used_rules:
        log.warning("sweep %s: exclude rule %d (%s) matches no cell", sweep.name, i, sweep.exclude[i])
    cells: list[Cell] = []
    for rnd, (config, spec) in interleave(configs, sweep.repeats):
        repeated = spec.model_copy(update={"repeat": rnd}) if rnd else spec
        cells.append(Cell(len(cells), rnd, repeated, config))
    return cells


def interleave(configs: Sequence[T], repeats: int) -> list[tuple[int, T]]:
    """(round, configuration) in run order: `repeats` rounds of every configuration, odd rounds reversed (see
    `expand` for why)."""
    return [(rnd, c) for rnd in range(repeats) for c in (configs if rnd % 2 == 0 else configs[::-1])]


def parse_only(items: Sequence[str]) -> dict[str, list[str]]:
    """`--only key=value` options -> {key: [values]}; the same key twice means either value."""
    filters: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise HarnessError(f"--only {item!r}: use KEY=VALUE, e.g. --only policy=lru")
        if key not in (*RunSpec.model_fields, "run_id"):
            raise HarnessError(f"--only {item!r}: unknown key {key!r} (a run-spec field or run_id)")
        filters.setdefault(key, []).append(value.strip())
    return filters


def select(cells: list[Cell], filters: dict[str, list[str]]) -> list[Cell]:
    """The cells matching every --only key (any of its values); error when none does."""
    if not filters:
        return cells
    chosen = [c for c in cells if _matches({**c.spec.model_dump(), "run_id": c.run_id}, filters)]
    if not chosen:
        shown = " ".join(f"{k}={'|'.join(v)}" for k, v in filters.items())
        raise HarnessError(f"no cell of the sweep matches --only {shown}")
    return chosen


def cell_result(results: Path, run_id: str) -> RunResult | None:
    """The cell's checked result, or None when it has none (or an unreadable one, which counts as not done).
    A result of a schema version this harness does not read is refused (HarnessError)."""
    path = results / run_id / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return load_result(path)
    except HarnessError as exc:
        if "schema version" in str(exc):
            raise
        log.warning("%s", exc)
        return None


def cell_status(results: Path, run_id: str) -> str | None:
    """'ok', 'failed' or 'skipped' (a peer that is not installed) when the cell has a result, else None."""
    result = cell_result(results, run_id)
    return None if result is None else result.status


@dataclass
class CellOutcome:
    cell: Cell
    status: Literal["ok", "failed", "skipped"]
    reason: str | None = None
    duration_s: float = 0.0
    record: dict[str, Any] = field(default_factory=dict)
    ran: bool = True
    """False for a cell found done on resume and not run again."""
    summary: dict[str, Any] = field(default_factory=dict)
    """The result's key figures (harness.result_model.summary_row); empty without a readable result."""

    @property
    def valid(self) -> bool | None:
        return self.summary.get("valid")

    @property
    def final_status(self) -> str:
        """The status of the cell's result (for a cell found done: the status it was found in)."""
        return self.summary.get("status") or self.status


def sweep_exit_code(outcomes: Sequence[CellOutcome]) -> ExitCode:
    """4 when any cell failed, else 3 when any is INVALID, else 0 (skipped peers do not fail a sweep)."""
    if any(o.final_status == "failed" for o in outcomes):
        return ExitCode.FAILED
    if any(o.final_status == "ok" and o.valid is False for o in outcomes):
        return ExitCode.INVALID
    return ExitCode.OK


def sweep_summary(name: str | None, results: Path, outcomes: Sequence[CellOutcome]) -> dict[str, Any]:
    """What `harness sweep --json` prints: one row per cell and the exit status."""
    return {
        "sweep": name,
        "results": str(results),
        "exit_code": int(sweep_exit_code(outcomes)),
        "cells": [
            {
                **o.summary,
                "run_id": o.cell.run_id,
                "cell": o.cell.label(),
                "status": o.final_status,
                "ran": o.ran,
                "reason": o.reason,
                "duration_s": o.duration_s,
            }
            for o in outcomes
        ],
    }


def prepare_models(cells: Sequence[Cell]) -> None:
    """Pack every local model the cells name whose pack is missing or stale, each in a child process (torch
    stays out of the sweep), so the run_ids computed here are the ones the cells compute. A model that cannot
    be packed is left to its cells, which fail with the packer's message."""
    folders = {local_model_dir(c.spec.model) for c in cells}
    for folder in sorted(f for f in folders if f is not None and (f / "config.json").is_file()):
        if pack_looks_current(folder):
            continue
        log.info("packing %s before the sweep", folder)
        argv = [sys.executable, "-m", "harness", "model", "pack", str(folder)]
        proc = subprocess.run(argv, capture_output=True, text=True, preexec_fn=child_preexec(), check=False)
        if proc.returncode != 0:
            log.warning("cannot pack %s: %s", folder, proc.stderr.strip().splitlines()[-1:])


class SweepProgress(Protocol):
    """What the runner tells its display (the CLI draws a rich progress bar from it)."""

    def begin(self, to_run: int, already_done: int) -> None: ...
    def cell_started(self, cell: Cell) -> None: ...
    def cell_finished(self, outcome: CellOutcome) -> None: ...


class CellStartError(HarnessError):
    """The cell's command could not be started (not found, not executable): the cell fails, the sweep goes on."""


CellExecutor = Callable[["SweepRunner", list[Cell]], Iterator[CellOutcome]]
"""Runs the cells to do and yields their outcomes as they finish (serial_cells; harness.cluster's on Ray)."""


def serial_cells(runner: SweepRunner, cells: list[Cell]) -> Iterator[CellOutcome]:
    """One cell after the other on this machine."""
    for cell in cells:
        if runner.progress:
            runner.progress.cell_started(cell)
        try:
            yield runner.run_cell(cell)
        except RunClaimed as exc:  # another sweep or run writes this cell now: leave it to that one
            yield CellOutcome(cell, "skipped", str(exc), ran=False)


class SweepRunner:
    """Runs cells one subprocess each, under their budgets, and records what happened to every one.

    As a library: `SweepRunner(sweep, results).run(cells)` for a sweep, `run_one_cell(spec, results)` for one
    cell given its spec."""

    def __init__(
        self,
        sweep: SweepSpec,
        results: str | Path,
        *,
        command: Sequence[str] = DEFAULT_CELL_COMMAND,
        force: bool = False,
        retry_failed: bool = True,
        progress: SweepProgress | None = None,
        executor: CellExecutor | None = None,
    ) -> None:
        self.sweep = sweep
        self.results = Path(results)
        self.command = tuple(command)
        self.force = force
        self.retry_failed = retry_failed
        self.progress = progress
        self.executor = executor
        if not any("{spec}" in part for part in self.command):
            raise HarnessError("the cell command must contain {spec} (the cell's spec.json)")

    def plan(self, cells: list[Cell]) -> list[tuple[Cell, str | None]]:
        """Each cell with its current status ('ok', 'failed', 'skipped' or None for no result)."""
        return [(c, cell_status(self.results, c.run_id)) for c in cells]

    def to_run(self, status: str | None) -> bool:
        return self.force or status is None or (status == "failed" and self.retry_failed)

    def run(self, cells: list[Cell]) -> list[CellOutcome]:
        self.results.mkdir(parents=True, exist_ok=True)
        prepare_models(cells)
        write_json_atomic(
            self.results / "sweep.json",
            {
                "sweep": self.sweep.model_dump(mode="json"),
                "started_at": _now(),
                "cells": [
                    {"run_id": c.run_id, "position": c.position, "round": c.round, "config": c.config}
                    for c in expand(self.sweep)
                ],
            },
        )
        plan = self.plan(cells)
        todo = [c for c, status in plan if self.to_run(status)]
        outcomes = [self._done(c, status) for c, status in plan if c not in todo]
        if self.progress:
            self.progress.begin(len(todo), len(outcomes))
        for outcome in (self.executor or serial_cells)(self, todo):
            log.info(
                "cell %s (%s): %s %s", outcome.cell.run_id, outcome.cell.label(), outcome.status, outcome.reason or ""
            )
            outcomes.append(outcome)
            if self.progress:
                self.progress.cell_finished(outcome)
        return sorted(outcomes, key=lambda o: o.cell.position)

    def _done(self, cell: Cell, status: str | None) -> CellOutcome:
        """A cell found done on resume: not run again, its result's figures kept for the table."""
        result = cell_result(self.results, cell.run_id)
        summary = summary_row(result) if result is not None else {}
        return CellOutcome(cell, "skipped", f"already {status}", ran=False, summary=summary)

    def fail_cell(self, cell: Cell, reason: str, duration_s: float, extra: dict[str, Any] | None = None) -> CellOutcome:
        """Record a cell that failed outside its process (e.g. its cluster node died): record and failed result."""
        folder = self.results / cell.run_id
        folder.mkdir(parents=True, exist_ok=True)
        record = {
            "run_id": cell.run_id,
            "position": cell.position,
            "round": cell.round,
            "config": cell.config,
            "exit_status": None,
            "duration_s": duration_s,
            "budget": None,
            "status": "failed",
            "reason": reason,
            **(extra or {}),
        }
        write_json_atomic(folder / CELL_RECORD_FILE, record)
        _write_failed_result(folder / RESULT_FILE, cell, reason, record, "")
        return CellOutcome(cell, "failed", reason, duration_s, record)

    def run_cell(self, cell: Cell) -> CellOutcome:
        """Run one cell in its own process under its budget, holding its folder; record how it ended."""
        folder = self.results / cell.run_id
        with claim_run_dir(folder):
            spec_file = write_json_atomic(folder / SPEC_FILE, cell.spec.canonical())
            argv = [
                part.format(spec=spec_file, results=self.results, run_id=cell.run_id, python=sys.executable)
                for part in self.command
            ]
            drop = "disabled"
            if self.sweep.drop_caches:
                drop = drop_page_cache([p for p in (cell.spec.ssd, cell.spec.model) if p and Path(p).exists()])
            began_unix = time.time()
            began = time.perf_counter()
            try:
                rc, timed_out, cgroup, counters = self._launch(cell, argv, folder, began_unix)
            except CellStartError as exc:  # a bad --cell-command fails this cell; the sweep goes on
                return self.fail_cell(cell, str(exc), time.perf_counter() - began, {"command": argv})
            record = {
                "run_id": cell.run_id,
                "position": cell.position,
                "round": cell.round,
                "config": cell.config,
                "command": argv,
                "exit_status": rc,
                "duration_s": time.perf_counter() - began,
                "started_at": datetime.fromtimestamp(began_unix, UTC).isoformat(timespec="seconds"),
                "page_cache_drop": drop,
                "budget": {"mode": cgroup.mode, "reason": cgroup.reason, "limit_bytes": cgroup.limit_bytes, **counters},
            }
            return self._record(cell, folder, record, timed_out, counters)

    def _launch(
        self, cell: Cell, argv: list[str], folder: Path, began_unix: float
    ) -> tuple[int, bool, CellCgroup, dict[str, int | None]]:
        """Start the cell inside its cgroup as a child that dies with the sweep; wait, with the cell timeout."""
        env = {**lock_held_env(folder), BUDGET_CHILD_ENV: "1"}
        with (
            CellCgroup(cell.spec.ram_budget_bytes, cell.run_id) as cgroup,
            open(folder / "stdout.log", "wb") as out,
            open(folder / "stderr.log", "wb") as err,
        ):
            try:
                proc = start_child([*cgroup.prefix, *argv], env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
            except OSError as exc:
                raise CellStartError(f"the cell command {argv[0]!r} cannot start: {exc.strerror or exc}") from None
            timed_out = False
            try:
                rc = proc.wait(timeout=self.sweep.cell_timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                proc.kill()
                rc = proc.wait()
            except KeyboardInterrupt:
                _stop(proc)
                _set_aside_partial_result(folder / RESULT_FILE, began_unix)
                raise
            return rc, timed_out, cgroup, cgroup.counters()

    def _record(
        self, cell: Cell, folder: Path, record: dict[str, Any], timed_out: bool, counters: dict[str, int | None]
    ) -> CellOutcome:
        """Judge how the cell ended, write its sweep record (and a failed result where it failed)."""
        result_path = folder / RESULT_FILE
        stderr_tail = _tail(folder / "stderr.log")
        timeout_s = self.sweep.cell_timeout_s
        reason = _failure_reason(record["exit_status"], timed_out, timeout_s, counters, result_path, stderr_tail)
        result = None if reason is not None else cell_result(self.results, cell.run_id)
        status: Literal["ok", "failed", "skipped"] = "failed" if result is None else result.status
        if result is not None and result.status == "skipped":
            reason = result.error
        if status == "failed":
            result = _write_failed_result(result_path, cell, reason or "no result", record, stderr_tail)
        record["status"], record["reason"] = status, reason
        write_json_atomic(folder / CELL_RECORD_FILE, record)
        summary = summary_row(result) if result is not None else {}
        return CellOutcome(cell, status, reason, record["duration_s"], record, summary=summary)


def run_one_cell(
    spec: RunSpec, results: str | Path, *, command: Sequence[str] = DEFAULT_CELL_COMMAND, drop_caches: bool = True
) -> CellOutcome:
    """Run one cell given its spec into `results`, as a sweep would (own process, budget, failure record)."""
    sweep = SweepSpec.model_validate({"name": spec.run_id, "drop_caches": drop_caches})
    return SweepRunner(sweep, results, command=command).run_cell(Cell(0, spec.repeat, spec, {}))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _stop(proc: subprocess.Popen) -> None:
    """Let an interrupted cell exit (it usually got the terminal's SIGINT too), then kill it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=_INTERRUPT_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _set_aside_partial_result(result_path: Path, since_unix: float) -> None:
    """An interrupted cell is not done: move aside any result it wrote so a resume runs it again."""
    try:
        written = result_path.stat().st_mtime >= since_unix
    except FileNotFoundError:
        return
    if written:
        os.replace(result_path, result_path.with_name("result.interrupted.json"))


def _failure_reason(
    rc: int,
    timed_out: bool,
    timeout_s: float | None,
    counters: dict[str, int | None],
    result_path: Path,
    stderr_tail: str,
) -> str | None:
    """None for a cell that ended with a result of its own (ok, INVALID, skipped); else why it failed, in one
    line. A kill is blamed on the memory limit only when the cgroup's counters show an OOM kill."""
    if timed_out:
        return f"timed out after {timeout_s:.0f} s (cell_timeout)"
    killed = kill_reason(rc, counters)
    if killed is not None:
        return killed
    if rc not in (0, ExitCode.INVALID, ExitCode.FAILED):
        last = next((line.strip() for line in reversed(stderr_tail.splitlines()) if line.strip()), "")
        return f"exited with status {rc}: {last[:_REASON_CHARS]}" if last else f"exited with status {rc}"
    if not result_path.is_file():
        return f"exited with status {rc} without writing {RESULT_FILE}"
    try:
        result = load_result(result_path)
    except HarnessError as exc:
        return f"exited with status {rc} but {exc}"
    if result.status == "failed":
        return result.error or "the run reported status 'failed'"
    return None


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-_STDERR_TAIL_LINES:])[-_STDERR_TAIL_CHARS:]


def _write_failed_result(
    result_path: Path, cell: Cell, reason: str, record: dict[str, Any], stderr_tail: str
) -> RunResult:
    """Keep the cell's own result if it wrote a readable one (marked failed); otherwise write a minimal one."""
    failure = {
        "reason": reason,
        "exit_status": record["exit_status"],
        "stderr_tail": stderr_tail,
        "duration_s": record["duration_s"],
        "budget": record["budget"],
    }
    try:
        result = load_result(result_path) if result_path.is_file() else None
    except HarnessError:
        result = None
    if result is None:
        validity = Validity()
        validity.fail(
            reason,
            "raise the cell's ram_budget" if OOM_REASON in reason else "see failure.stderr_tail and stderr.log",
        )
        result = RunResult.envelope(
            cell.spec, run_identity(cell.spec), "failed", reason, environment=environment(), validity=validity.to_dict()
        )
    result = result.model_copy(update={"status": "failed", "error": result.error or reason, "failure": failure})
    result.save(result_path.parent)
    return result
