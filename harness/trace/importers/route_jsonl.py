"""Per-token JSONL of route simulators: one line per (token, layer).

    {"t": 0, "layer": 0, "experts": [3, 7], "phase": "decode"}

`t` is the token's time step (the forward pass); `phase` is optional (default decode); optional
`seq` (or `seq_id`: any JSON scalar) names the sequence and optional `weights` the router weights.
Rows of different sequences with the same `t` share one step (a batch). Each file is replayed after
the one before: its steps continue where the previous file's ended.
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
from harness.trace.schema import PHASE_NAMES

_Token = tuple[str, object, int]  # (file, seq, t)


def import_route_jsonl(
    paths: Sequence[Path], out: Path, num_experts: int | None = None, expert_bytes: int = 0
) -> ImportReport:
    if not paths:
        raise HarnessError("trace import needs at least one input file")
    check_num_experts(num_experts)
    # token -> {layer: (experts, weights)}; phase and the line that first named it
    tokens: dict[_Token, dict[int, tuple[list[int], list[float] | None]]] = {}
    phases: dict[_Token, str] = {}
    first_line: dict[_Token, str] = {}
    k_seen: dict[int, str] = {}
    for path in map(Path, paths):
        for number, line in read_lines(path):
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise TypeError
                t, layer = obj["t"], obj["layer"]
                if not isinstance(t, int) or not isinstance(layer, int) or isinstance(t, bool) or t < 0 or layer < 0:
                    raise HarnessError(f"{where}: 't' and 'layer' must be non-negative integers")
                experts = expert_list(obj["experts"], where, num_experts)
                weights = obj.get("weights")
                if weights is not None:
                    weights = [float(w) for w in weights]
                    if len(weights) != len(experts):
                        raise HarnessError(f"{where}: {len(weights)} weights for {len(experts)} experts")
                phase = obj.get("phase", "decode")
                seq = obj.get("seq", obj.get("seq_id"))
            except (json.JSONDecodeError, TypeError, ValueError) as exc:
                raise HarnessError(f"{where}: malformed route line ({exc.__class__.__name__})") from None
            except KeyError as exc:
                raise HarnessError(f"{where}: route line lacks {exc.args[0]!r} (t, layer, experts)") from None
            if phase not in PHASE_NAMES:
                raise HarnessError(f"{where}: unknown phase {phase!r} (prefill or decode)")
            if isinstance(seq, list | dict):
                raise HarnessError(f"{where}: 'seq' must be a number or a string")
            k_seen.setdefault(len(experts), where)
            if len(k_seen) > 1:
                raise HarnessError(f"{where}: {len(experts)} experts where {next(iter(k_seen))} were selected before")
            token = (str(path), seq, t)
            layers = tokens.setdefault(token, {})
            if layer in layers:
                raise HarnessError(f"{where}: layer {layer} of t={t} (seq {seq!r}) appears twice")
            layers[layer] = (experts, weights)
            first_line.setdefault(token, where)
            if phases.setdefault(token, phase) != phase:
                raise HarnessError(
                    f"{where}: phase {phase!r} differs from {phases[token]!r} of the same token's other layers"
                )
    order = sorted({layer for layers in tokens.values() for layer in layers})
    rows = TokenRows(layers=order, top_k=next(iter(k_seen)))
    seq_ids: dict[tuple[str, object], int] = {}
    next_pos: dict[int, int] = {}
    # Files in the order given, tokens by time within a file (the lines of a token may be anywhere);
    # each file's steps start one after the last step of the file before.
    file_rank = {str(p): i for i, p in enumerate(map(Path, paths))}
    first_t: dict[str, int] = {}
    for file, _, t in tokens:
        first_t[file] = min(t, first_t.get(file, t))
    base: dict[str, int] = {}
    last_step = -1
    for token in sorted(tokens, key=lambda tok: (file_rank[tok[0]], tok[2])):
        file, seq, t = token
        step = base.setdefault(file, last_step + 1) + t - first_t[file]
        last_step = max(last_step, step)
        layers = tokens[token]
        missing = [layer for layer in order if layer not in layers]
        if missing:
            raise HarnessError(f"{first_line[token]}: token t={t} (seq {seq!r}) has no line for layers {missing}")
        sid = seq_ids.setdefault((file, seq), len(seq_ids))
        pos = next_pos.get(sid, 0)
        next_pos[sid] = pos + 1
        weights = [layers[layer][1] for layer in order]
        rows.add(
            sid,
            pos,
            step,
            phases[token],
            [layers[layer][0] for layer in order],
            None if any(w is None for w in weights) else weights,
        )
    source = (
        f"imported from route-simulator JSONL ({', '.join(Path(p).name for p in paths)}); step = t, files one"
        " after another; num_layers is max layer + 1"
    )
    inferred = write_token_trace(rows, out, order, num_experts, expert_bytes, source)
    return ImportReport(rows=len(rows), sequences=len(seq_ids), layers=order, notes=[n for n in [inferred] if n])
