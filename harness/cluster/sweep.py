"""Sweep cells as Ray tasks: each runs on a node that has what the cell names, as a local cell runs there.

On the node, the task runs the very `SweepRunner.run_cell` of a local sweep (subprocess, the node's
own memory cgroup, failure capture) into a node-local staging folder, adds the node's identity to
the cell's record, and sends the cell folder back as a tar archive; the head unpacks it into its
`--results` folder as the task finishes. A task that dies (its worker or node killed) is recorded
as a failed cell and the sweep goes on; resume and progress are the local runner's.
"""

from __future__ import annotations

import io
import logging
import os
import platform
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.cluster import connect
from harness.cluster.resources import cell_requirements
from harness.results import read_json, write_json_atomic
from harness.spec import RunSpec
from harness.sweep import CELL_RECORD_FILE, Cell, CellOutcome, SweepRunner, SweepSpec

log = logging.getLogger(__name__)

STAGING = Path(tempfile.gettempdir()) / "harness-cluster"
"""Where a node writes its cells before sending them to the head (removed once sent)."""


def run_cell_on_node(
    sweep: dict[str, Any], cell: dict[str, Any], command: list[str], staging: str
) -> tuple[dict[str, Any], bytes]:
    """The body of the Ray task: run one cell here, return (outcome fields, tar of the cell folder)."""
    import ray

    spec = SweepSpec.model_validate(sweep)
    the_cell = Cell(cell["position"], cell["round"], RunSpec.model_validate(cell["spec"]), cell["config"])
    stage = Path(staging) / f"{spec.name}-{os.getpid()}"
    runner = SweepRunner(spec, stage, command=command, force=True)
    outcome = runner.run_cell(the_cell)
    folder = stage / the_cell.run_id
    record_path = folder / CELL_RECORD_FILE
    record = read_json(record_path)
    record["node"] = {"node_id": ray.get_runtime_context().get_node_id(), "hostname": platform.node()}
    write_json_atomic(record_path, record)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(folder, arcname=the_cell.run_id)
    shutil.rmtree(stage, ignore_errors=True)
    fields = {"status": outcome.status, "reason": outcome.reason, "duration_s": outcome.duration_s, "record": record}
    return fields, buffer.getvalue()


class RayCells:
    """A sweep executor (harness.sweep.CellExecutor) that runs every cell as a Ray task on a fitting node."""

    def __init__(self, address: str, staging: Path = STAGING) -> None:
        self.ray = connect(address)
        self.staging = staging
        self.task = self.ray.remote(max_retries=0)(run_cell_on_node)

    def __call__(self, runner: SweepRunner, cells: list[Cell]) -> Iterator[CellOutcome]:
        sweep = runner.sweep.model_dump(mode="json")
        command = list(runner.command)
        pending: dict[Any, tuple[Cell, float]] = {}
        for cell in cells:
            payload = {"position": cell.position, "round": cell.round, "config": cell.config}
            payload["spec"] = cell.spec.canonical()
            ref = self.task.options(**cell_requirements(cell.spec)).remote(sweep, payload, command, str(self.staging))
            pending[ref] = (cell, time.perf_counter())
            if runner.progress:
                runner.progress.cell_started(cell)
        try:
            while pending:
                done, _ = self.ray.wait(list(pending), num_returns=1)
                cell, began = pending.pop(done[0])
                yield self._collect(runner, cell, done[0], time.perf_counter() - began)
        finally:
            for ref in pending:  # interrupted: nothing keeps running on the nodes
                self.ray.cancel(ref, force=True)

    def _collect(self, runner: SweepRunner, cell: Cell, ref: Any, waited_s: float) -> CellOutcome:
        try:
            fields, archive = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            reason = f"the Ray task died ({exc.__class__.__name__}): {first}" if first else exc.__class__.__name__
            return runner.fail_cell(cell, reason, waited_s, {"node": None})
        folder = runner.results / cell.run_id
        if folder.exists():
            shutil.rmtree(folder)  # a rerun (--force, or a failed cell run again) replaces the old folder whole
        runner.results.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            tar.extractall(runner.results, filter="data")
        return CellOutcome(cell, fields["status"], fields["reason"], fields["duration_s"], fields["record"])
