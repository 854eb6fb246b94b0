"""vLLM's returned routed experts, saved with numpy: `[tokens, moe_layers, top_k]` integer arrays.

A `.npy` file holds one array (one request); a `.npz` holds one array per request, in the order they
were saved. Each array becomes a sequence. The arrays carry no timing, weights or phase: every token
is its own step (as for FLAME's teacher-forced traces), labelled decode, and the sequences are replayed
one after another. The layer axis indexes the MoE layers (0..moe_layers-1), not model layer numbers.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from harness.errors import HarnessError
from harness.trace.importers import ImportReport
from harness.trace.importers.common import MAX_EXPERT_ID, check_num_experts
from harness.trace.schema import TraceMeta, TraceWriter


def _arrays(path: Path) -> list[tuple[str, np.ndarray]]:
    if not path.is_file():
        raise HarnessError(f"trace file {path} does not exist")
    if path.stat().st_size == 0:
        raise HarnessError(f"{path}: empty file (no array)")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise HarnessError(f"{path}: not a readable .npy/.npz array file ({exc.__class__.__name__}: {exc})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            try:
                arrays = [(f"{path}[{name!r}]", loaded[name]) for name in loaded.files]
            except ValueError as exc:  # an object array needs pickle, which is refused
                raise HarnessError(f"{path}: {exc}") from None
        if not arrays:
            raise HarnessError(f"{path}: empty .npz (no array)")
        return arrays
    return [(str(path), loaded)]


def _check(where: str, array: np.ndarray, num_experts: int | None) -> np.ndarray:
    if array.ndim != 3 or 0 in array.shape:
        raise HarnessError(f"{where}: expected a non-empty [tokens, moe_layers, top_k] array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise HarnessError(f"{where}: expert ids must be integers (dtype {array.dtype})")
    array = array.astype(np.int64)
    limit = MAX_EXPERT_ID + 1 if num_experts is None else num_experts
    bad = np.argwhere((array < 0) | (array >= limit))
    if len(bad):
        token, layer, _ = bad[0]
        value = int(array[tuple(bad[0])])
        raise HarnessError(f"{where}: token {token}, MoE layer {layer}: expert id {value} is outside 0..{limit - 1}")
    ordered = np.sort(array, axis=-1)
    repeats = np.argwhere((ordered[..., 1:] == ordered[..., :-1]).any(axis=-1))
    if len(repeats):
        token, layer = repeats[0]
        raise HarnessError(
            f"{where}: token {token}, MoE layer {layer}: expert ids {array[token, layer].tolist()} repeat"
        )
    return array


def import_vllm_routed(
    paths: Sequence[Path], out: Path, num_experts: int | None = None, expert_bytes: int = 0
) -> ImportReport:
    if not paths:
        raise HarnessError("trace import needs at least one input file")
    check_num_experts(num_experts)
    arrays = [(where, _check(where, a, num_experts)) for path in map(Path, paths) for where, a in _arrays(path)]
    shapes = {a.shape[1:] for _, a in arrays}
    if len(shapes) != 1:
        raise HarnessError(f"arrays disagree on [moe_layers, top_k]: {sorted(shapes)}")
    n_layers, k = shapes.pop()
    inferred = 1 + max(int(a.max()) for _, a in arrays)
    experts_n = num_experts or inferred
    layers = list(range(n_layers))
    meta = TraceMeta(
        model="unknown",
        architecture="unknown",
        num_layers=n_layers,
        moe_layers=layers,
        num_experts=experts_n,
        top_k=k,
        expert_bytes=expert_bytes,
        source=(
            f"imported from vLLM routed experts ({', '.join(Path(p).name for p in paths)}); one sequence per array,"
            " one step per token, labelled decode; layers are MoE-layer indices"
        ),
    )
    writer = TraceWriter(meta)
    step = 0
    for seq_id, (_, array) in enumerate(arrays):
        for pos in range(array.shape[0]):
            for li in layers:
                writer.add(seq_id, pos, step, "decode", li, array[pos, li].tolist(), None)
            step += 1
    writer.write(out)
    notes = [] if num_experts else [f"num_experts inferred as max id + 1 = {inferred} (pass --num-experts)"]
    return ImportReport(rows=step, sequences=len(arrays), layers=layers, notes=notes)
