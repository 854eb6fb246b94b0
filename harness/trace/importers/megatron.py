"""Megatron-Core routing traces (`--moe-routing-trace-path`): `router_trace_rank{R}.jsonl`.

Format, as read from Megatron-LM's `megatron/core/transformer/moe/router_trace.py` (RouterTracer):
one JSON record per (step, block, layer) router call,

    {"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 3, "rank": 0,
     "num_tokens": 128, "topk": 22, "top_indices": [[12, 45, ...], ...]}

`top_indices` is `[num_tokens][topk]`; MTP records carry `"block": "mtp"` and an `mtp_idx`; optional
`hs_*` / `logit_*` fields point into binary sidecars (ignored here). In inference a step is one forward
pass (the tracer starts a new step when a layer fires again); in training it is one iteration.

Where this importer has to guess (the records do not say):
- A layer that fires more than once within a step (training with several micro-batches) is taken as
  one forward pass per firing, in file order. Activation recomputation would fire it again as well and
  cannot be told apart: trace without recomputation.
- `layer` is the index in the module name `decoder.layers.N` (0-based, local to a pipeline stage),
  used as the layer number as is.
- Records have no request ids, phases or router weights: each file (rank) is one sequence, every row
  is labelled decode, weights are null, and expert ids keep the order the router emitted (by
  descending score for index outputs, by ascending id where the router returned a boolean map).
- Only decoder records are imported; MTP records and stages other than `pre_dispatch` are skipped and
  counted. Several files (ranks) are replayed one after another; tensor-parallel ranks repeat the same
  tokens, so pass one rank per data-parallel group.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from harness.errors import HarnessError
from harness.trace.importers import ImportReport
from harness.trace.importers.common import (
    TokenRows,
    check_num_experts,
    expert_list,
    read_lines,
    write_token_trace,
)

_Pass = tuple[int, int]  # (Megatron step, firing of the layer within the step)


def _int(obj: dict, name: str, where: str) -> int:
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise HarnessError(f"{where}: {name!r} must be a non-negative integer (got {value!r:.30})")
    return value


def _read(path: Path, num_experts: int | None) -> tuple[dict[_Pass, dict[int, tuple[list[list[int]], str]]], int]:
    """(pass -> layer -> (top_indices, where)) in file order, and the number of skipped records."""
    passes: dict[_Pass, dict[int, tuple[list[list[int]], str]]] = {}
    firings: dict[tuple[int, int], int] = {}
    skipped = 0
    for number, line in read_lines(path):
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise TypeError
            if obj.get("block", "decoder") != "decoder" or obj.get("stage", "pre_dispatch") != "pre_dispatch":
                skipped += 1
                continue
            step, layer = _int(obj, "step", where), _int(obj, "layer", where)
            top = obj["top_indices"]
            if not isinstance(top, list) or not top:
                raise HarnessError(f"{where}: 'top_indices' must be a non-empty [num_tokens][topk] list")
            tokens = [expert_list(ids, where, num_experts) for ids in top]
        except json.JSONDecodeError as exc:
            raise HarnessError(f"{where}: malformed JSON ({exc.msg})") from None
        except TypeError:
            raise HarnessError(f"{where}: a routing-trace record must be a JSON object") from None
        except KeyError as exc:
            raise HarnessError(f"{where}: record lacks {exc.args[0]!r} (step, layer, top_indices)") from None
        if "num_tokens" in obj and obj["num_tokens"] != len(tokens):
            raise HarnessError(f"{where}: num_tokens {obj['num_tokens']} but top_indices has {len(tokens)} rows")
        k_values = {len(ids) for ids in tokens}
        if len(k_values) != 1 or ("topk" in obj and obj["topk"] not in k_values):
            raise HarnessError(f"{where}: rows of top_indices must all hold topk={obj.get('topk')} ids")
        firing = firings.get((step, layer), 0)
        firings[step, layer] = firing + 1
        passes.setdefault((step, firing), {})[layer] = (tokens, where)
    return passes, skipped


def import_megatron_jsonl(
    paths: Sequence[Path], out: Path, num_experts: int | None = None, expert_bytes: int = 0
) -> ImportReport:
    if not paths:
        raise HarnessError("trace import needs at least one input file")
    check_num_experts(num_experts)
    read = [(Path(path), *_read(Path(path), num_experts)) for path in paths]
    layers = sorted({layer for _, passes, _ in read for by_layer in passes.values() for layer in by_layer})
    if not layers:
        raise HarnessError(f"{read[0][0]}: no decoder records (only MTP or other stages)")
    k_values = {len(t[0][0]) for _, passes, _ in read for by_layer in passes.values() for t in by_layer.values()}
    if len(k_values) != 1:
        raise HarnessError(f"records select different numbers of experts {sorted(k_values)}: topk must be constant")
    rows = TokenRows(layers=layers, top_k=k_values.pop())
    step = 0
    for seq_id, (_, passes, _) in enumerate(read):
        pos = 0
        for key in sorted(passes):
            by_layer = passes[key]
            first_where = min((w for _, w in by_layer.values()), key=lambda w: int(w.rsplit(":", 1)[1]))
            missing = [layer for layer in layers if layer not in by_layer]
            if missing:
                raise HarnessError(f"{first_where}: step {key[0]} has no record for layers {missing}")
            counts = {layer: len(by_layer[layer][0]) for layer in layers}
            if len(set(counts.values())) != 1:
                raise HarnessError(f"{first_where}: step {key[0]}'s layers route different token counts {counts}")
            for j in range(counts[layers[0]]):
                rows.add(seq_id, pos, step, "decode", [by_layer[layer][0][j] for layer in layers])
                pos += 1
            step += 1
    skipped = sum(s for _, _, s in read)
    source = (
        f"imported from Megatron-Core routing traces ({', '.join(p.name for p, _, _ in read)}); one sequence per"
        f" file, one step per forward pass, all labelled decode, no weights; {skipped} MTP/other-stage records"
        " skipped; num_layers is max layer + 1"
    )
    inferred = write_token_trace(rows, out, layers, num_experts, expert_bytes, source)
    notes = [n for n in [inferred] if n]
    if skipped:
        notes.append(f"skipped {skipped} records that are not decoder pre_dispatch routing (MTP heads, other stages)")
    return ImportReport(rows=len(rows), sequences=len(read), layers=layers, notes=notes)
