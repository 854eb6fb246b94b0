"""Per-prompt routing CSVs: `Layer ID,Batch Number,Token,Activated Expert IDs`, one file per prompt.

    Layer ID,Batch Number,Token,Activated Expert IDs
    0,0,The,"[3, 7]"

`Batch Number` is the forward pass within the prompt (0: the prompt, then one per generated token),
`Token` the token's text (not used), `Activated Expert IDs` the selected experts as a bracketed list.
Within one (batch, layer) the rows are the batch's tokens in order. Each file becomes a sequence; a
folder stands for its `*.csv` files in name order. Files are replayed one after another. A batch of
more than one token is labelled prefill, a one-token batch decode. Extra columns are ignored.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from harness.errors import HarnessError
from harness.trace.importers import ImportReport
from harness.trace.importers.common import TokenRows, check_ids, check_num_experts, write_token_trace

COLUMNS = ("Layer ID", "Batch Number", "Token", "Activated Expert IDs")


def _expand(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.csv"))
            if not found:
                raise HarnessError(f"{path}: folder holds no .csv file")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise HarnessError(f"trace file {path} does not exist")
    return files


def _parse_ids(text: str, where: str) -> list[int]:
    inner = text.strip()
    if not (inner.startswith("[") and inner.endswith("]")):
        raise HarnessError(f"{where}: Activated Expert IDs {text!r:.40} is not a bracketed list such as [3, 7]")
    parts = inner[1:-1].replace(",", " ").split()
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise HarnessError(f"{where}: Activated Expert IDs {text!r:.40} holds a non-integer") from None
    if not ids:
        raise HarnessError(f"{where}: Activated Expert IDs is an empty list")
    return ids


def _read(path: Path, num_experts: int | None) -> dict[int, dict[int, list[tuple[list[int], str]]]]:
    """batch -> layer -> [(experts, where)] in file order."""
    batches: dict[int, dict[int, list[tuple[list[int], str]]]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise HarnessError(f"{path}: empty file (no header)")
            header = [h.strip().lstrip("\ufeff") for h in header]
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise HarnessError(f"{path}:1: missing column(s) {', '.join(missing)} (need {','.join(COLUMNS)})")
            index = {c: header.index(c) for c in COLUMNS}
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if not row or not "".join(row).strip():
                    continue
                if len(row) != len(header):
                    raise HarnessError(f"{where}: {len(row)} fields where the header has {len(header)}")
                try:
                    layer, batch = int(row[index["Layer ID"]]), int(row[index["Batch Number"]])
                except ValueError:
                    raise HarnessError(f"{where}: Layer ID and Batch Number must be integers") from None
                if layer < 0 or batch < 0:
                    raise HarnessError(f"{where}: Layer ID and Batch Number must not be negative")
                ids = _parse_ids(row[index["Activated Expert IDs"]], where)
                check_ids(ids, where, num_experts)
                batches.setdefault(batch, {}).setdefault(layer, []).append((ids, where))
    except UnicodeDecodeError:
        raise HarnessError(f"{path}: not a UTF-8 text file") from None
    except csv.Error as exc:
        raise HarnessError(f"{path}: malformed CSV ({exc})") from None
    if not batches:
        raise HarnessError(f"{path}: no data rows below the header")
    return batches


def import_prompt_csv(
    paths: Sequence[Path], out: Path, num_experts: int | None = None, expert_bytes: int = 0
) -> ImportReport:
    files = _expand(paths)
    if not files:
        raise HarnessError("trace import needs at least one input file or folder")
    check_num_experts(num_experts)
    read = [(path, _read(path, num_experts)) for path in files]
    layers = sorted({layer for _, batches in read for by_layer in batches.values() for layer in by_layer})
    k_values = {len(ids) for _, b in read for by_layer in b.values() for rows in by_layer.values() for ids, _ in rows}
    if len(k_values) != 1:
        raise HarnessError(f"rows select different numbers of experts {sorted(k_values)}: top-k must be constant")
    rows = TokenRows(layers=layers, top_k=k_values.pop())
    step = 0
    for seq_id, (_, batches) in enumerate(read):
        pos = 0
        for batch in sorted(batches):
            by_layer = batches[batch]
            counts = {layer: len(by_layer.get(layer, [])) for layer in layers}
            if len(set(counts.values())) != 1:
                first = next(iter(by_layer.values()))[0][1]
                raise HarnessError(f"{first}: batch {batch} has a different number of tokens per layer {counts}")
            n = counts[layers[0]]
            phase = "prefill" if n > 1 else "decode"
            for j in range(n):
                rows.add(seq_id, pos, step, phase, [by_layer[layer][j][0] for layer in layers])
                pos += 1
            step += 1
    source = (
        f"imported from per-prompt routing CSVs ({len(files)} files, first {files[0].name}); one sequence per"
        " file, one step per Batch Number, files one after another; num_layers is max layer + 1"
    )
    inferred = write_token_trace(rows, out, layers, num_experts, expert_bytes, source)
    return ImportReport(rows=len(rows), sequences=len(files), layers=layers, notes=[n for n in [inferred] if n])
