"""Importers of public routing-trace formats into the harness's Parquet trace (see the README, "Routing traces").

- FLAME-MoE-Traces: one file per MoE layer, torch-saved dicts (`.pt`: `indices` [N, k], `scores` [N, k],
  `layer`, `model`, `sequence_length`, ...) or CSV (`layer_id,token_id,expert_0..expert_{E-1}`, the router
  probability in the k selected columns, 0 elsewhere). Rows are tokens in stream order.
- vLLM MoE-logger JSONL: a `meta` line, then one `route` line per (token row, layer); one file per layer or
  all layers in one. The warm-up profiling block is dropped (and counted), step boundaries are rebuilt.

Further formats live in one module each (route_jsonl, vllm_routed, prompt_csv, megatron); `import_trace`
dispatches to all of them by name.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.errors import HarnessError
from harness.trace.importers.common import check_ids, check_num_experts, read_lines
from harness.trace.schema import TraceMeta, TraceWriter

log = logging.getLogger(__name__)
_LAYER_IN_NAME = re.compile(r"layer_?(\d+)$")

FORMATS = ("flame", "vllm-jsonl", "route-jsonl", "vllm-routed", "prompt-csv", "megatron-jsonl")
UNIFORM_WEIGHT_TOLERANCE = 1e-6
"""Router weights that differ by less than this are 'uniform' (vLLM's warm-up rows); a trained router
never produces k exactly equal weights on real text."""


@dataclass
class ImportReport:
    """What an import did, for the CLI to print."""

    rows: int
    sequences: int
    layers: list[int]
    dropped_warmup_rows: int = 0
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- FLAME


@dataclass
class _FlameLayer:
    layer: int
    indices: np.ndarray  # [N, k] expert ids, by descending score
    scores: np.ndarray  # [N, k] router probabilities
    num_experts: int | None
    model: str | None
    sequence_length: int | None


def _read_flame_pt(path: Path) -> _FlameLayer:
    import torch

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a saved dict
        raise HarnessError(f"{path}: not a readable FLAME .pt trace ({exc.__class__.__name__})") from None
    if not isinstance(blob, dict) or "indices" not in blob or "layer" not in blob:
        raise HarnessError(f"{path}: not a FLAME trace (a dict with 'indices' and 'layer' expected)")
    indices = np.asarray(blob["indices"], dtype=np.int64)
    scores = np.asarray(blob["scores"], dtype=np.float32) if "scores" in blob else np.ones_like(indices, np.float32)
    if indices.ndim != 2 or scores.shape != indices.shape:
        raise HarnessError(f"{path}: 'indices' must be [tokens, k] with 'scores' of the same shape")
    seq_len = blob.get("sequence_length")
    return _FlameLayer(int(blob["layer"]), indices, scores, None, blob.get("model"), seq_len)


def _read_flame_csv(path: Path) -> _FlameLayer:
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header or header[:2] != ["layer_id", "token_id"] or not header[2].startswith("expert_"):
            raise HarnessError(f"{path}: not a FLAME CSV (header layer_id,token_id,expert_0,... expected)")
        try:
            rows = np.array([[float(x) for x in row] for row in reader], dtype=np.float64)
        except ValueError as exc:
            raise HarnessError(f"{path}: non-numeric value in a FLAME CSV ({exc})") from None
    num_experts = len(header) - 2
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] != len(header):
        raise HarnessError(f"{path}: FLAME CSV rows must have {len(header)} columns")
    # The public CSVs carry layer_id 0 in every file: the layer number is the one in the file name.
    named = _LAYER_IN_NAME.search(path.stem)
    layers = np.unique(rows[:, 0])
    if named is None and len(layers) != 1:
        raise HarnessError(f"{path}: a FLAME CSV holds one layer, found layers {layers.astype(int).tolist()}")
    layer = int(named.group(1)) if named else int(layers[0])
    probs = rows[:, 2:]
    k = int((probs[0] > 0).sum())
    if k == 0 or not np.all((probs > 0).sum(axis=1) == k):
        raise HarnessError(f"{path}: every row must select the same number of experts (non-zero columns)")
    # Descending probability, ties by expert id (stable sort of the negated values).
    indices = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(probs, indices, axis=1).astype(np.float32)
    return _FlameLayer(layer, indices, scores, num_experts, None, None)


def import_flame(
    paths: Sequence[Path],
    out: Path,
    sequence_length: int | None = None,
    num_experts: int | None = None,
    expert_bytes: int = 0,
) -> ImportReport:
    """FLAME per-layer files -> one harness trace; each token is its own step (teacher-forced routing).

    `sequence_length` splits the token stream into sequences; default: the `.pt` files' own
    `sequence_length`, else one sequence. (The public slice's metadata says 64 where the content is
    512-token sequences: pass it explicitly.)
    """
    if not paths:
        raise HarnessError("trace import needs at least one input file")
    layers: dict[int, _FlameLayer] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise HarnessError(f"trace file {path} does not exist")
        item = _read_flame_pt(path) if path.suffix == ".pt" else _read_flame_csv(path)
        if item.layer in layers:
            raise HarnessError(f"{path}: layer {item.layer} given twice (pass one file per layer, .pt or .csv)")
        layers[item.layer] = item
    order = sorted(layers)
    shapes = {layers[layer].indices.shape for layer in order}
    if len(shapes) != 1:
        raise HarnessError(f"FLAME layer files disagree on [tokens, k]: {sorted(shapes)}")
    tokens, k = shapes.pop()
    first = layers[order[0]]
    seq_len = sequence_length or first.sequence_length or tokens
    if seq_len < 1:
        raise HarnessError(f"sequence length must be at least 1 token (got {seq_len})")
    if tokens % seq_len:
        log.warning("%d tokens are not a multiple of sequence length %d: the last sequence is short", tokens, seq_len)
    stacked = np.stack([layers[layer].indices for layer in order], axis=1)  # [N, layers, k]
    weights = np.stack([layers[layer].scores for layer in order], axis=1)
    inferred = int(stacked.max()) + 1
    experts_n = num_experts or first.num_experts or inferred
    _check_expert_ids(int(stacked.min()), inferred - 1, experts_n, "FLAME trace")
    meta = TraceMeta(
        model=first.model or "flame-moe",
        architecture="flame-moe",
        num_layers=order[-1] + 1,
        moe_layers=order,
        num_experts=experts_n,
        top_k=k,
        expert_bytes=expert_bytes,
        source=(
            f"imported from FLAME-MoE-Traces ({', '.join(Path(p).name for p in paths)}); teacher-forced routing,"
            f" one step per token, labelled decode; sequences of {seq_len} tokens; num_layers is max layer + 1"
        ),
    )
    writer = TraceWriter(meta)
    for row in range(tokens):
        for li, layer in enumerate(order):
            writer.add(
                row // seq_len,
                row % seq_len,
                row,
                "decode",
                layer,
                stacked[row, li].tolist(),
                weights[row, li].tolist(),
            )
    writer.write(out)
    return ImportReport(rows=tokens, sequences=-(-tokens // seq_len), layers=order)


# ----------------------------------------------------------------------------------------- vLLM JSONL


@dataclass
class _Route:
    req: str
    token_idx: int
    experts: list[int]
    weights: list[float] | None


def _read_vllm_lines(path: Path) -> tuple[dict, dict[int, list[_Route]]]:
    meta: dict | None = None
    by_layer: dict[int, list[_Route]] = {}
    for number, line in read_lines(path):
        try:
            obj = json.loads(line)
            kind = obj.get("type")
            if kind == "meta":
                meta = obj
            elif kind == "route":
                weights = obj.get("topk_weights")
                route = _Route(
                    str(obj["req_id"]),
                    int(obj["token_idx"]),
                    [int(e) for e in obj["topk_ids"]],
                    None if weights is None else [float(w) for w in weights],
                )
                by_layer.setdefault(int(obj["layer"]), []).append(route)
            else:
                raise HarnessError(f"{path}:{number}: unknown line type {kind!r} (meta or route expected)")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise HarnessError(f"{path}:{number}: malformed MoE-logger line ({exc.__class__.__name__})") from None
    if meta is None:
        raise HarnessError(f"{path}: no meta line (the first line of a vLLM MoE-logger file is type 'meta')")
    return meta, by_layer


def _meta_int(meta: dict, key: str) -> int | None:
    """An optional positive integer of the meta line, or one clear error."""
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise HarnessError(f"vLLM meta line: {key} must be a positive integer (got {value!r})")
    return value


def _check_expert_ids(lowest: int, highest: int, num_experts: int, where: str) -> None:
    """Expert ids must lie in 0..num_experts-1, and num_experts must fit the trace's int16 column."""
    check_num_experts(num_experts)
    check_ids(sorted({lowest, highest}), where, num_experts)


def _is_uniform(weights: list[float] | None) -> bool:
    return weights is not None and max(weights) - min(weights) < UNIFORM_WEIGHT_TOLERANCE


def _warmup_rows(routes: list[_Route]) -> int:
    """Length of the leading block of rows with one constant expert set and uniform weights."""
    if not routes or not _is_uniform(routes[0].weights):
        return 0
    head = set(routes[0].experts)
    n = 0
    while n < len(routes) and _is_uniform(routes[n].weights) and set(routes[n].experts) == head:
        n += 1
    return n


def _steps_of(routes: list[_Route]) -> tuple[np.ndarray, str]:
    """Forward-pass index of each row: a new pass starts where token_idx does not increase.

    A token_idx that never restarts is one running counter: the pass boundaries are lost, so every
    row becomes its own step (said in the trace's source).
    """
    idx = np.array([r.token_idx for r in routes], dtype=np.int64)
    restarts = np.ones(len(idx), dtype=bool)
    restarts[1:] = np.diff(idx) <= 0
    if len(idx) > 1 and restarts.sum() == 1:
        return np.arange(len(idx)), "token_idx is a running counter: one step per row"
    return np.cumsum(restarts) - 1, "steps rebuilt from token_idx restarts"


def import_vllm_jsonl(paths: Sequence[Path], out: Path, expert_bytes: int = 0) -> ImportReport:
    """vLLM MoE-logger JSONL (one file per layer, or all layers in one) -> one harness trace.

    Sequences: distinct `req_id`s in first-seen order (a constant req_id gives one sequence). Phase: a
    step in which some request contributes more than one row is prefill, otherwise decode.
    """
    if not paths:
        raise HarnessError("trace import needs at least one input file")
    metas: list[dict] = []
    by_layer: dict[int, list[_Route]] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise HarnessError(f"trace file {path} does not exist")
        file_meta, routes = _read_vllm_lines(path)
        metas.append(file_meta)
        for layer, rows in routes.items():
            if layer in by_layer:
                raise HarnessError(f"{path}: layer {layer} also appears in another input file")
            by_layer[layer] = rows
    if not by_layer:
        raise HarnessError("the vLLM files hold no route lines")
    order = sorted(by_layer)
    dropped = {layer: _warmup_rows(by_layer[layer]) for layer in order}
    if len(set(dropped.values())) != 1:
        raise HarnessError(f"warm-up blocks differ in length between layers {dropped}: cannot align the layers")
    n_drop = dropped[order[0]]
    routes = {layer: by_layer[layer][n_drop:] for layer in order}
    lengths = {layer: len(rows) for layer, rows in routes.items()}
    if len(set(lengths.values())) != 1 or lengths[order[0]] == 0:
        raise HarnessError(f"after the warm-up block, layers have different row counts {lengths}")
    ref = routes[order[0]]
    for layer in order[1:]:
        if any(a.token_idx != b.token_idx or a.req != b.req for a, b in zip(ref, routes[layer], strict=True)):
            raise HarnessError(f"layer {layer}'s rows do not line up with layer {order[0]}'s (req_id, token_idx)")
    k_values = {len(r.experts) for rows in routes.values() for r in rows}
    top_k = _meta_int(metas[0], "top_k") or max(k_values)
    if k_values != {top_k}:
        raise HarnessError(f"rows select {sorted(k_values)} experts, top_k is {top_k}")
    max_id = max(max(r.experts) for rows in routes.values() for r in rows)
    min_id = min(min(r.experts) for rows in routes.values() for r in rows)
    num_experts = _meta_int(metas[0], "num_experts") or max_id + 1
    _check_expert_ids(min_id, max_id, num_experts, "vLLM trace")
    steps, step_note = _steps_of(ref)
    seq_ids: dict[str, int] = {}
    positions: dict[str, int] = {}
    seq_of_row, pos_of_row = [], []
    for route in ref:
        seq_of_row.append(seq_ids.setdefault(route.req, len(seq_ids)))
        pos_of_row.append(positions.get(route.req, 0))
        positions[route.req] = pos_of_row[-1] + 1
    phase_of_step: dict[int, str] = {}
    seen: dict[int, set[str]] = {}
    for step, route in zip(steps.tolist(), ref, strict=True):
        reqs = seen.setdefault(step, set())
        if route.req in reqs:
            phase_of_step[step] = "prefill"
        reqs.add(route.req)
    model = str(metas[0].get("model_id", "unknown"))
    meta = TraceMeta(
        model=model,
        architecture="unknown",
        num_layers=order[-1] + 1,
        moe_layers=order,
        num_experts=num_experts,
        top_k=top_k,
        expert_bytes=expert_bytes,
        source=(
            f"imported from vLLM MoE-logger JSONL ({', '.join(Path(p).name for p in paths)}); "
            f"{n_drop} warm-up rows per layer dropped; {step_note}"
        ),
    )
    writer = TraceWriter(meta)
    for row in range(len(ref)):
        step = int(steps[row])
        for layer in order:
            route = routes[layer][row]
            writer.add(
                seq_of_row[row],
                pos_of_row[row],
                step,
                phase_of_step.get(step, "decode"),
                layer,
                route.experts,
                route.weights,
            )
    writer.write(out)
    notes = [step_note]
    if len(seq_ids) == 1 and len(ref) > 1:
        notes.append("one req_id for all rows: the rows form one sequence")
    return ImportReport(
        rows=len(ref), sequences=len(seq_ids), layers=order, dropped_warmup_rows=n_drop * len(order), notes=notes
    )


def import_trace(fmt: str, paths: Sequence[Path], out: Path, **options: object) -> ImportReport:
    """Dispatch by format name; a clear error for an unknown one."""
    if fmt == "flame":
        return import_flame(paths, out, **options)  # type: ignore[arg-type]
    if fmt == "vllm-jsonl":
        return import_vllm_jsonl(paths, out, **options)  # type: ignore[arg-type]
    # One module per further format, imported on use (they import ImportReport from here).
    if fmt == "route-jsonl":
        from harness.trace.importers.route_jsonl import import_route_jsonl

        return import_route_jsonl(paths, out, **options)  # type: ignore[arg-type]
    if fmt == "vllm-routed":
        from harness.trace.importers.vllm_routed import import_vllm_routed

        return import_vllm_routed(paths, out, **options)  # type: ignore[arg-type]
    if fmt == "prompt-csv":
        from harness.trace.importers.prompt_csv import import_prompt_csv

        return import_prompt_csv(paths, out, **options)  # type: ignore[arg-type]
    if fmt == "megatron-jsonl":
        from harness.trace.importers.megatron import import_megatron_jsonl

        return import_megatron_jsonl(paths, out, **options)  # type: ignore[arg-type]
    raise HarnessError(f"unknown trace format {fmt!r}; known formats: {', '.join(FORMATS)}")
