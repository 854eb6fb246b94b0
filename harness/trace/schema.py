"""The harness's routing-trace format (one Parquet row per (step, layer) and token) and its loader.

Columns: seq_id int32, pos int32, step int32, phase dictionary<string>, layer int16,
experts list<int16> (top-k ids by descending weight), weights list<float32> (nullable).
Key-value metadata describes the model (see the README, "Routing traces"). The loader turns a file into dense
per-sequence arrays `[rows, layers, k]` for fast replay.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from harness.errors import HarnessError

TRACE_SCHEMA_VERSION = 1
PHASE_NAMES = ("prefill", "decode")
MAX_EXPERTS = 2**15
"""Experts per layer a trace can name: expert ids are int16."""

ARROW_SCHEMA = pa.schema(
    [
        ("seq_id", pa.int32()),
        ("pos", pa.int32()),
        ("step", pa.int32()),
        ("phase", pa.dictionary(pa.int8(), pa.string())),
        ("layer", pa.int16()),
        ("experts", pa.list_(pa.int16())),
        ("weights", pa.list_(pa.float32())),
    ]
)


@dataclass
class TraceMeta:
    model: str
    architecture: str
    num_layers: int
    moe_layers: list[int]
    num_experts: int
    top_k: int
    expert_bytes: int
    source: str
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    schema_version: int = TRACE_SCHEMA_VERSION

    def to_parquet_metadata(self) -> dict[bytes, bytes]:
        return {k.encode(): json.dumps(v).encode() for k, v in asdict(self).items()}

    @classmethod
    def from_parquet_metadata(cls, raw: dict[bytes, bytes] | None, path: Path) -> TraceMeta:
        raw = raw or {}
        values = {}
        for name in cls.__dataclass_fields__:
            blob = raw.get(name.encode())
            if blob is None:
                raise HarnessError(f"{path}: not a harness trace (metadata key {name!r} missing)")
            try:
                values[name] = json.loads(blob)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise HarnessError(f"{path}: trace metadata {name!r} is not JSON: {blob[:60]!r}") from None
        _check_meta_types(values, path)
        if values["schema_version"] > TRACE_SCHEMA_VERSION:
            raise HarnessError(f"{path}: trace schema {values['schema_version']} is newer than this harness")
        return cls(**values)


def _check_meta_types(values: dict[str, object], path: Path) -> None:
    """The metadata a replay relies on has the right JSON types and sane values, else one clear error."""
    ints = ("num_layers", "num_experts", "top_k", "expert_bytes", "schema_version")
    layers = values["moe_layers"]
    wrong = [n for n in ints if not isinstance(values[n], int) or isinstance(values[n], bool)]
    if not isinstance(layers, list) or not layers or not all(isinstance(x, int) for x in layers):
        wrong.append("moe_layers")
    if wrong:
        raise HarnessError(f"{path}: trace metadata {', '.join(wrong)} of the wrong type (integers expected)")
    num_experts, top_k = values["num_experts"], values["top_k"]
    assert isinstance(num_experts, int) and isinstance(top_k, int)
    if not 1 <= top_k <= num_experts <= MAX_EXPERTS:
        raise HarnessError(
            f"{path}: trace metadata needs 1 <= top_k ({top_k}) <= num_experts ({num_experts}) <= {MAX_EXPERTS}"
        )


@dataclass
class SequenceRouting:
    """One sequence's routing as dense arrays, rows in step order (rows of one step are adjacent)."""

    seq_id: int
    step: np.ndarray  # [rows] int32, forward-pass index
    pos: np.ndarray  # [rows] int32
    phase: np.ndarray  # [rows] int8, index into PHASE_NAMES
    experts: np.ndarray  # [rows, layers, k] int16, layer axis follows TraceMeta.moe_layers
    weights: np.ndarray | None  # [rows, layers, k] float32


@dataclass
class Trace:
    meta: TraceMeta
    sequences: list[SequenceRouting]

    @property
    def num_rows(self) -> int:
        return sum(len(s.step) for s in self.sequences)


class TraceWriter:
    """Accumulates rows in memory (column lists) and writes one Parquet file atomically."""

    def __init__(self, meta: TraceMeta) -> None:
        self.meta = meta
        self._cols: dict[str, list] = {name: [] for name in ARROW_SCHEMA.names}

    def add(
        self, seq_id: int, pos: int, step: int, phase: str, layer: int, experts: list[int], weights: list[float] | None
    ) -> None:
        cols = self._cols
        cols["seq_id"].append(seq_id)
        cols["pos"].append(pos)
        cols["step"].append(step)
        cols["phase"].append(phase)
        cols["layer"].append(layer)
        cols["experts"].append(experts)
        cols["weights"].append(weights)

    def __len__(self) -> int:
        return len(self._cols["seq_id"])

    def write(self, path: Path) -> Path:
        table = pa.Table.from_pydict(self._cols, schema=ARROW_SCHEMA)
        table = table.replace_schema_metadata(self.meta.to_parquet_metadata())
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
        return path


def read_trace(path: str | Path) -> Trace:
    """Load a harness trace into dense per-sequence arrays; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"trace file {path} does not exist")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a non-Parquet file
        raise HarnessError(f"{path}: not a readable Parquet trace ({exc.__class__.__name__}: {exc})") from None
    meta = TraceMeta.from_parquet_metadata(table.schema.metadata, path)
    missing = set(ARROW_SCHEMA.names) - set(table.column_names)
    if missing:
        raise HarnessError(f"{path}: trace lacks columns {sorted(missing)}")
    k = meta.top_k
    layer_index = {layer: i for i, layer in enumerate(meta.moe_layers)}
    seq = table.column("seq_id").to_numpy()
    step = table.column("step").to_numpy()
    pos = table.column("pos").to_numpy()
    layer = table.column("layer").to_numpy()
    phases = table.column("phase").to_pylist()
    unknown = sorted({str(p) for p in phases} - set(PHASE_NAMES))
    if unknown:
        raise HarnessError(f"{path}: unknown phase {', '.join(unknown)} (a row is {' or '.join(PHASE_NAMES)})")
    phase = np.array([PHASE_NAMES.index(p) for p in phases], dtype=np.int8)
    flat = table.column("experts").combine_chunks()
    if len(flat.flatten()) != len(table) * k:
        raise HarnessError(f"{path}: every row must list exactly top_k={k} experts")
    experts = flat.flatten().to_numpy().reshape(len(table), k)
    w_col = table.column("weights").combine_chunks()
    has_weights = w_col.null_count == 0 and len(w_col.flatten()) == len(table) * k
    weights = w_col.flatten().to_numpy().reshape(len(table), k) if has_weights else None
    try:
        layer_pos = np.array([layer_index[int(x)] for x in layer], dtype=np.int64)
    except KeyError as exc:
        raise HarnessError(f"{path}: row of layer {exc.args[0]} not in moe_layers {meta.moe_layers}") from None
    # Rows -> (seq, step, pos) groups holding one entry per layer.
    order = np.lexsort((layer_pos, pos, step, seq))
    sequences = []
    n_layers = len(meta.moe_layers)
    for seq_id in np.unique(seq):
        rows = order[seq[order] == seq_id]
        if len(rows) % n_layers:
            raise HarnessError(f"{path}: sequence {seq_id} does not have a row for every MoE layer")
        rows = rows.reshape(-1, n_layers)
        if not np.all(layer_pos[rows] == np.arange(n_layers)):
            raise HarnessError(f"{path}: sequence {seq_id} has a token without every MoE layer")
        first = rows[:, 0]
        sequences.append(
            SequenceRouting(
                seq_id=int(seq_id),
                step=step[first].astype(np.int32),
                pos=pos[first].astype(np.int32),
                phase=phase[first],
                experts=experts[rows].astype(np.int16),
                weights=None if weights is None else weights[rows].astype(np.float32),
            )
        )
    return Trace(meta=meta, sequences=sequences)
