"""Sweeps: a matrix of run specs expanded into cells, each run in its own process under its RAM budget.

A sweep file (YAML) has a `base` run spec, a `matrix` of lists per RunSpec field, `exclude` rules
and `repeats`. Cells are keyed by run_id: a cell is done when `<results>/<run_id>/result.json`
says `ok` or `failed`, so an interrupted sweep resumes where it stopped. A cell that crashes, is
killed by its memory limit or times out is recorded as failed (exit status, reason, the tail of
its stderr) and the sweep goes on.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from harness.budget import CellCgroup, drop_page_cache
from harness.errors import HarnessError
from harness.results import Validity, environment, read_json, result_envelope, write_json_atomic
from harness.spec import RunSpec, load_run_spec
from harness.units import parse_duration, parse_size

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
SPEC_FILE = "spec.json"
CELL_RECORD_FILE = "sweep.json"
OOM_REASON = "killed by the memory limit (cgroup OOM)"
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
        try:
            spec = load_run_spec({**sweep.base, **config})
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
    for rnd in range(sweep.repeats):
        ordered = configs if rnd % 2 == 0 else configs[::-1]
        for config, spec in ordered:
            repeated = spec.model_copy(update={"repeat": rnd}) if rnd else spec
            cells.append(Cell(len(cells), rnd, repeated, config))
    return cells


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


def cell_status(results: Path, run_id: str) -> str | None:
    """'ok', 'failed' or 'skipped' (a peer that is not installed) when the cell is done, else None."""
    path = results / run_id / RESULT_FILE
    if not path.is_file():
        return None
    try:
        status = read_json(path).get("status")
    except (OSError, ValueError, AttributeError):
        return None
    return status if status in ("ok", "failed", "skipped") else None


@dataclass
class CellOutcome:
    cell: Cell
    status: Literal["ok", "failed", "skipped"]
    reason: str | None = None
    duration_s: float = 0.0
    record: dict[str, Any] = field(default_factory=dict)


class SweepProgress(Protocol):
    """What the runner tells its display (the CLI draws a rich progress bar from it)."""

    def begin(self, to_run: int, already_done: int) -> None: ...
    def cell_started(self, cell: Cell) -> None: ...
    def cell_finished(self, outcome: CellOutcome) -> None: ...


class SweepRunner:
    """Runs cells one subprocess each, under their budgets, and records what happened to every one."""

    def __init__(
        self,
        sweep: SweepSpec,
        results: str | Path,
        *,
        command: Sequence[str] = DEFAULT_CELL_COMMAND,
        force: bool = False,
        progress: SweepProgress | None = None,
    ) -> None:
        self.sweep = sweep
        self.results = Path(results)
        self.command = tuple(command)
        self.force = force
        self.progress = progress
        if not any("{spec}" in part for part in self.command):
            raise HarnessError("the cell command must contain {spec} (the cell's spec.json)")

    def plan(self, cells: list[Cell]) -> list[tuple[Cell, str | None]]:
        """Each cell with its current status ('ok', 'failed' or None for not done)."""
        return [(c, cell_status(self.results, c.run_id)) for c in cells]

    def run(self, cells: list[Cell]) -> list[CellOutcome]:
        self.results.mkdir(parents=True, exist_ok=True)
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
        todo = [c for c, status in plan if self.force or status is None]
        outcomes = [CellOutcome(c, "skipped", f"already {status}") for c, status in plan if c not in todo]
        if self.progress:
            self.progress.begin(len(todo), len(outcomes))
        for cell in todo:
            if self.progress:
                self.progress.cell_started(cell)
            outcome = self.run_cell(cell)
            log.info("cell %s (%s): %s %s", cell.run_id, cell.label(), outcome.status, outcome.reason or "")
            outcomes.append(outcome)
            if self.progress:
                self.progress.cell_finished(outcome)
        return outcomes

    def run_cell(self, cell: Cell) -> CellOutcome:
        folder = self.results / cell.run_id
        folder.mkdir(parents=True, exist_ok=True)
        spec_file = write_json_atomic(folder / SPEC_FILE, cell.spec.canonical())
        argv = [
            part.format(spec=spec_file, results=self.results, run_id=cell.run_id, python=sys.executable)
            for part in self.command
        ]
        drop = "disabled"
        if self.sweep.drop_caches:
            drop = drop_page_cache([p for p in (cell.spec.ssd, cell.spec.model) if p and Path(p).exists()])
        result_path = folder / RESULT_FILE
        began_unix = time.time()
        began = time.perf_counter()
        timeout_s = self.sweep.cell_timeout_s
        with (
            CellCgroup(cell.spec.ram_budget_bytes, cell.run_id) as cgroup,
            open(folder / "stdout.log", "wb") as out,
            open(folder / "stderr.log", "wb") as err,
        ):
            try:
                proc = subprocess.Popen([*cgroup.prefix, *argv], stdout=out, stderr=err, stdin=subprocess.DEVNULL)
            except OSError as exc:
                # A command that cannot start fails this cell (status 127, as a shell says), not the sweep.
                err.write(f"cannot start {argv[0]}: {exc.strerror or exc}\n".encode())
                err.flush()
                proc = None
            timed_out = False
            try:
                rc = proc.wait(timeout=timeout_s) if proc is not None else _CANNOT_START
            except subprocess.TimeoutExpired:
                assert proc is not None
                timed_out = True
                proc.kill()
                rc = proc.wait()
            except KeyboardInterrupt:
                assert proc is not None
                _stop(proc)
                _set_aside_partial_result(result_path, began_unix)
                raise
            counters = cgroup.counters()
        duration_s = time.perf_counter() - began
        record = {
            "run_id": cell.run_id,
            "position": cell.position,
            "round": cell.round,
            "config": cell.config,
            "command": argv,
            "exit_status": rc,
            "duration_s": duration_s,
            "started_at": datetime.fromtimestamp(began_unix, UTC).isoformat(timespec="seconds"),
            "page_cache_drop": drop,
            "budget": {"mode": cgroup.mode, "reason": cgroup.reason, "limit_bytes": cgroup.limit_bytes, **counters},
        }
        stderr_tail = _tail(folder / "stderr.log")
        reason = _failure_reason(rc, timed_out, timeout_s, counters, cgroup.mode, result_path, stderr_tail)
        skipped = reason is None and read_json(result_path).get("status") == "skipped"
        if skipped:
            reason = read_json(result_path).get("error")
        record["status"] = "skipped" if skipped else "ok" if reason is None else "failed"
        record["reason"] = reason
        write_json_atomic(folder / CELL_RECORD_FILE, record)
        if skipped:
            return CellOutcome(cell, "skipped", reason, duration_s, record)
        if reason is None:
            return CellOutcome(cell, "ok", None, duration_s, record)
        _write_failed_result(result_path, cell, reason, record, stderr_tail)
        return CellOutcome(cell, "failed", reason, duration_s, record)


_CANNOT_START = 127
"""Exit status recorded for a cell command that could not be started (a shell's 'command not found')."""


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
    mode: str,
    result_path: Path,
    stderr_tail: str,
) -> str | None:
    """None for a cell that succeeded; else why it failed, in one line."""
    if timed_out:
        return f"timed out after {timeout_s:.0f} s (cell_timeout)"
    if counters.get("oom_kills"):
        return OOM_REASON
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        if -rc == signal.SIGKILL and mode != "accounting-only":
            return f"killed by SIGKILL, most likely {OOM_REASON}"
        return f"killed by signal {name}"
    if rc != 0:
        last = next((line.strip() for line in reversed(stderr_tail.splitlines()) if line.strip()), "")
        return f"exited with status {rc}: {last[:_REASON_CHARS]}" if last else f"exited with status {rc}"
    if not result_path.is_file():
        return f"exited with status 0 without writing {RESULT_FILE}"
    try:
        result = read_json(result_path)
    except (OSError, ValueError):
        return f"exited with status 0 but {RESULT_FILE} is not readable JSON"
    if result.get("status") not in ("ok", "skipped"):
        return result.get("error") or f"the run reported status {result.get('status')!r}"
    return None


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-_STDERR_TAIL_LINES:])[-_STDERR_TAIL_CHARS:]


def _write_failed_result(result_path: Path, cell: Cell, reason: str, record: dict[str, Any], stderr_tail: str) -> None:
    """Keep the cell's own result if it wrote one (marked failed); otherwise write a minimal failed result."""
    failure = {
        "reason": reason,
        "exit_status": record["exit_status"],
        "stderr_tail": stderr_tail,
        "duration_s": record["duration_s"],
        "budget": record["budget"],
    }
    result: dict[str, Any] | None = None
    if result_path.is_file():
        try:
            result = read_json(result_path)
        except (OSError, ValueError):
            result = None
    if not isinstance(result, dict):
        validity = Validity()
        validity.fail(
            reason,
            "raise the cell's ram_budget" if OOM_REASON in reason else "see failure.stderr_tail and stderr.log",
        )
        result = {
            **result_envelope(cell.spec, "failed", reason),
            "resolved": None,
            "metrics": None,
            "environment": environment(),
            "validity": validity.to_dict(),
            "files": {},
        }
    result["status"] = "failed"
    result["error"] = result.get("error") or reason
    result["failure"] = failure
    write_json_atomic(result_path, result)
