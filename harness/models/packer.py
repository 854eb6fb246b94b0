"""`harness model pack`: write the expert store of a checkpoint and the non-expert weights apart.

Reads the checkpoint's safetensors lazily (one tensor at a time), so a model larger than RAM packs.
Every (layer, expert) becomes one contiguous blob [gate_up_proj | down_proj] at a 4 KiB-aligned
offset of `packed/experts.bin`; `packed/index.json` is written last, so its presence means complete.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from harness.errors import HarnessError
from harness.models.adapters import ArchAdapter, adapter_for_model_type, load_config
from harness.store.layout import (
    DENSE_FILE,
    EXPERTS_FILE,
    INDEX_FILE,
    PACK_DIR,
    ExpertEntry,
    PackIndex,
    TensorSlot,
    align_up,
)

log = logging.getLogger(__name__)
_VERIFY_CHUNK_BYTES = 64 << 20


def checkpoint_files(model_dir: Path) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise HarnessError(f"{model_dir} has no *.safetensors weights (only safetensors checkpoints are supported)")
    return files


def _fingerprint(files: list[Path]) -> dict[str, list[int]]:
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def _open(path: Path):  # safetensors returns a private handle type
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise HarnessError(f"{path} is not a readable safetensors file ({exc}); the checkpoint is corrupt") from None


def _get(handles: dict[Path, object], where: tuple[Path, str], index: int | None = None) -> torch.Tensor:
    path, key = where
    try:
        if index is None:
            return handles[path].get_tensor(key)  # type: ignore[attr-defined]
        return handles[path].get_slice(key)[index]  # type: ignore[attr-defined]
    except (SafetensorError, OSError, ValueError) as exc:
        raise HarnessError(f"cannot read tensor {key} from {path} ({exc}); the checkpoint is corrupt") from None


def pack_model(
    model_dir: str | Path, force: bool = False, progress: Callable[[int, int], None] | None = None
) -> tuple[PackIndex, bool]:
    """Pack `model_dir`; returns (index, whether anything was written). Idempotent: an up-to-date,
    complete pack is kept as it is."""
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    adapter = adapter_for_model_type(config.model_type)
    files = checkpoint_files(model_dir)
    out = model_dir / PACK_DIR
    index_path = out / INDEX_FILE
    fingerprint = _fingerprint(files)
    if index_path.exists() and not force:
        existing = PackIndex.load(index_path)
        expected = existing.stride_bytes * len(existing.entries)
        experts = out / EXPERTS_FILE
        if existing.source_fingerprint == fingerprint and experts.exists() and experts.stat().st_size == expected:
            return existing, False
    handles = {f: _open(f) for f in files}
    per_expert: dict[tuple[int, int], dict[str, tuple[Path, str]]] = defaultdict(dict)
    fused: dict[int, dict[str, tuple[Path, str]]] = defaultdict(dict)
    dense: dict[str, tuple[Path, str]] = {}
    for path, handle in handles.items():
        for key in handle.keys():  # type: ignore[attr-defined]  # noqa: SIM118 - the handle is not iterable
            parsed = adapter.expert_key(key)
            if parsed is None:
                dense[adapter.memory_key(key)] = (path, key)
            elif parsed[1] is None:
                fused[parsed[0]][parsed[2]] = (path, key)
            else:
                per_expert[(parsed[0], parsed[1])][parsed[2]] = (path, key)
    layers = sorted({layer for layer, _ in per_expert} | set(fused))
    if not layers:
        raise HarnessError(f"{model_dir} has no MoE expert tensors: not a Mixture-of-Experts checkpoint")
    num_experts = int(getattr(config, adapter.num_experts_attr))
    hidden, inter = int(config.hidden_size), int(getattr(config, adapter.expert_intermediate_attr))
    shapes = {"gate_up_proj": [2 * inter, hidden], "down_proj": [hidden, inter]}
    sample = _expert_tensors(adapter, handles, per_expert, fused, layers[0], 0, shapes)
    dtype = sample["gate_up_proj"].dtype
    itemsize = sample["gate_up_proj"].element_size()
    tensors, offset = [], 0
    for name in ("gate_up_proj", "down_proj"):
        nbytes = shapes[name][0] * shapes[name][1] * itemsize
        tensors.append(TensorSlot(name, shapes[name], offset, nbytes))
        offset += nbytes
    expert_bytes, stride = offset, align_up(offset)
    out.mkdir(parents=True, exist_ok=True)
    index_path.unlink(missing_ok=True)
    partial = out / (EXPERTS_FILE + ".partial")
    entries: list[ExpertEntry] = []
    total = len(layers) * num_experts
    padding = bytes(stride - expert_bytes)
    with open(partial, "wb") as sink:
        for layer in layers:
            for expert in range(num_experts):
                blob = _expert_tensors(adapter, handles, per_expert, fused, layer, expert, shapes)
                payload = b"".join(_raw_bytes(blob[t.name], dtype, f"layer {layer} expert {expert}") for t in tensors)
                entries.append(ExpertEntry(layer, expert, sink.tell(), zlib.crc32(payload)))
                sink.write(payload)
                sink.write(padding)
                if progress:
                    progress(len(entries), total)
        sink.flush()
        os.fsync(sink.fileno())
    dense_tensors = {name: _get(handles, where).contiguous() for name, where in sorted(dense.items())}
    save_file(dense_tensors, str(out / DENSE_FILE))
    index = PackIndex(
        model_type=config.model_type,
        dtype=str(dtype).removeprefix("torch."),
        num_experts=num_experts,
        top_k=int(config.num_experts_per_tok),
        moe_layers=layers,
        expert_bytes=expert_bytes,
        stride_bytes=stride,
        tensors=tensors,
        entries=entries,
        dense_bytes=sum(t.numel() * t.element_size() for t in dense_tensors.values()),
        source_fingerprint=fingerprint,
    )
    verify_pack(partial, index)
    partial.replace(out / EXPERTS_FILE)
    index.save(index_path)
    return index, True


def _expert_tensors(
    adapter: ArchAdapter,
    handles: dict,
    per_expert: dict,
    fused: dict,
    layer: int,
    expert: int,
    shapes: dict[str, list[int]],
) -> dict[str, torch.Tensor]:
    if layer in fused:
        if set(fused[layer]) != {"gate_up_proj", "down_proj"}:
            raise HarnessError(f"layer {layer} has fused expert tensors {sorted(fused[layer])}, expected both")
        blob = {name: _get(handles, fused[layer][name], expert) for name in ("gate_up_proj", "down_proj")}
    else:
        roles = per_expert.get((layer, expert), {})
        if set(roles) != {"gate", "up", "down"}:
            raise HarnessError(
                f"layer {layer} expert {expert}: found projections {sorted(roles)}, expected "
                "gate, up and down; the checkpoint is incomplete"
            )
        gate, up, down = (_get(handles, roles[r]) for r in ("gate", "up", "down"))
        blob = {"gate_up_proj": torch.cat([gate, up], dim=0), "down_proj": down}
    for name, tensor in blob.items():
        if list(tensor.shape) != shapes[name]:
            raise HarnessError(
                f"layer {layer} expert {expert}: {name} has shape {list(tensor.shape)}, "
                f"config.json implies {shapes[name]}"
            )
    return blob


def _raw_bytes(tensor: torch.Tensor, dtype: torch.dtype, what: str) -> bytes:
    if tensor.dtype != dtype:
        raise HarnessError(f"{what}: dtype {tensor.dtype} differs from the other experts' {dtype}")
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def verify_pack(experts_file: Path, index: PackIndex) -> None:
    """Re-read every blob and compare its checksum with the index (raises HarnessError on mismatch)."""
    size = experts_file.stat().st_size
    if size != index.stride_bytes * len(index.entries):
        raise HarnessError(f"{experts_file}: size {size} does not match its index; re-run `harness model pack`")
    by_offset = sorted(index.entries, key=lambda e: e.offset)
    with open(experts_file, "rb", buffering=0) as source:
        for entry in by_offset:
            source.seek(entry.offset)
            payload = source.read(index.expert_bytes)
            if zlib.crc32(payload) != entry.crc32:
                raise HarnessError(
                    f"{experts_file}: layer {entry.layer} expert {entry.expert} fails its checksum; "
                    "re-run `harness model pack --force`"
                )


def pack_paths(model_dir: Path) -> dict[str, Path]:
    out = Path(model_dir) / PACK_DIR
    return {"dir": out, "experts": out / EXPERTS_FILE, "index": out / INDEX_FILE, "dense": out / DENSE_FILE}
