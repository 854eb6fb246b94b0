"""What every importer of a public routing format shares: expert-id checks that name the file and
line, and the dense token rows they all produce before one `TraceWriter` pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.errors import HarnessError
from harness.trace.schema import MAX_EXPERTS, PHASE_NAMES, TraceMeta, TraceWriter

MAX_EXPERT_ID = MAX_EXPERTS - 1
"""The trace stores expert ids as int16: larger ids cannot be represented."""


def expert_list(value: object, where: str, num_experts: int | None) -> list[int]:
    """A JSON/CSV list of expert ids -> ints, each in 0..num_experts-1 (0..32767 when unknown).

    `where` is "FILE:LINE" (or another place a reader can find), put at the head of the error.
    """
    if not isinstance(value, list | tuple) or not value:
        raise HarnessError(f"{where}: the expert list must be a non-empty list of ids (got {value!r:.60})")
    ids = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int | np.integer):
            raise HarnessError(f"{where}: expert id {item!r:.30} is not an integer")
        ids.append(int(item))
    check_ids(ids, where, num_experts)
    return ids


def check_ids(ids: Sequence[int], where: str, num_experts: int | None) -> None:
    """Refuse a negative id, one at or above `num_experts`, or one beyond int16 (the trace's column type)."""
    low, high = min(ids), max(ids)
    limit = MAX_EXPERT_ID + 1 if num_experts is None else num_experts
    if low < 0 or high >= limit:
        bad = low if low < 0 else high
        bound = (
            f"num_experts={num_experts}" if num_experts is not None else f"the trace's int16 ids (max {MAX_EXPERT_ID})"
        )
        raise HarnessError(f"{where}: expert id {bad} is outside 0..{limit - 1} ({bound})")
    if len(set(ids)) != len(ids):
        raise HarnessError(f"{where}: expert ids {list(ids)} repeat an expert (top-k ids are distinct)")


def check_num_experts(num_experts: int | None) -> None:
    if num_experts is not None and not 1 <= num_experts <= MAX_EXPERT_ID + 1:
        raise HarnessError(f"--num-experts must be between 1 and {MAX_EXPERT_ID + 1} (got {num_experts})")


def read_lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines of a text file with their 1-based numbers; an error for a missing or empty file."""
    if not path.is_file():
        raise HarnessError(f"trace file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            lines = [(n, line) for n, line in enumerate(handle, 1) if line.strip()]
    except UnicodeDecodeError:
        raise HarnessError(f"{path}: not a UTF-8 text file") from None
    if not lines:
        raise HarnessError(f"{path}: empty file (no records)")
    return lines


@dataclass
class TokenRows:
    """Imported routing as token rows (one per (sequence, token)), each with every layer's top-k."""

    layers: list[int]
    top_k: int
    seq_id: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    step: list[int] = field(default_factory=list)
    phase: list[str] = field(default_factory=list)
    experts: list[list[list[int]]] = field(default_factory=list)
    """[row][layer index][k]: expert ids, layer axis follows `layers`."""
    weights: list[list[list[float]] | None] = field(default_factory=list)

    def add(
        self, seq_id: int, pos: int, step: int, phase: str, experts: list[list[int]], weights: list | None = None
    ) -> None:
        self.seq_id.append(seq_id)
        self.pos.append(pos)
        self.step.append(step)
        self.phase.append(phase)
        self.experts.append(experts)
        self.weights.append(weights)

    def __len__(self) -> int:
        return len(self.seq_id)


def write_rows(rows: TokenRows, out: Path, meta: TraceMeta) -> None:
    """One Parquet row per (token row, layer); `meta.num_experts` must already bound every id."""
    if not len(rows):
        raise HarnessError("the input holds no token rows")
    if any(p not in PHASE_NAMES for p in rows.phase):
        raise HarnessError(f"phases must be one of {PHASE_NAMES}")
    writer = TraceWriter(meta)
    for i in range(len(rows)):
        weights = rows.weights[i]
        for li, layer in enumerate(rows.layers):
            writer.add(
                rows.seq_id[i],
                rows.pos[i],
                rows.step[i],
                rows.phase[i],
                layer,
                rows.experts[i][li],
                None if weights is None else weights[li],
            )
    writer.write(out)


def resolve_num_experts(given: int | None, rows: TokenRows) -> tuple[int, str | None]:
    """The model's expert count: as given (ids were checked against it while reading), else max id + 1
    with a note that it was inferred."""
    if given is not None:
        return given, None
    inferred = 1 + max(max(max(ids) for ids in row) for row in rows.experts)
    return inferred, f"num_experts inferred as max id + 1 = {inferred} (pass --num-experts for the model's own)"


def write_token_trace(
    rows: TokenRows, out: Path, layers: list[int], num_experts: int | None, expert_bytes: int, source: str
) -> str | None:
    """Write an imported trace of unknown model (num_layers = max layer + 1) from its token rows; returns the
    note when the expert count had to be inferred."""
    experts_n, inferred = resolve_num_experts(num_experts, rows)
    meta = TraceMeta(
        model="unknown",
        architecture="unknown",
        num_layers=layers[-1] + 1,
        moe_layers=layers,
        num_experts=experts_n,
        top_k=rows.top_k,
        expert_bytes=expert_bytes,
        source=source,
    )
    write_rows(rows, out, meta)
    return inferred
