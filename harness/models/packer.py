"""`harness model pack`: write the expert store of a checkpoint and the non-expert weights apart.

Reads the checkpoint's safetensors lazily (one tensor at a time), so a model larger than RAM packs.
Every (layer, expert) becomes one contiguous blob [gate_up_proj | down_proj] at a 4 KiB-aligned
offset of `experts.bin`; `index.json` is written last, so its presence means complete. The pack's folder
is `harness.models.locate.pack_dir` (beside a writable model folder, else the harness cache: never
inside the Hugging Face cache). The index records each blob's checksum and the pack's provenance
(`harness.models.provenance`).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from harness.errors import HarnessError
from harness.models.adapters import ArchAdapter, adapter_for_model_type, load_config
from harness.models.locate import pack_paths
from harness.models.provenance import check_config_unchanged, file_digest, shaping_config
from harness.models.provenance import pack_content_hashes as pack_content_hashes  # run ids: light home is provenance
from harness.store.checksum import expert_checksum
from harness.store.layout import EXPERTS_FILE, ExpertEntry, PackIndex, TensorSlot, align_up
from harness.store.reader import verify_expert_file

log = logging.getLogger(__name__)


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
    model_dir: str | Path,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    verify: bool = True,
    repair: bool = False,
) -> tuple[PackIndex, bool]:
    """Pack `model_dir`; returns (index, whether anything was written). Idempotent: a complete pack of the
    same checkpoint files, whose every blob passes its checksum (`verify`), is kept as it is. A pack of
    an older format or of changed checkpoint files is re-packed. A pack whose bytes fail verification is
    re-packed with `repair` (`harness model pack`), else refused (a run). A config.json changed since
    packing is refused unless `force`."""
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    adapter = adapter_for_model_type(config.model_type)
    files = checkpoint_files(model_dir)
    paths = pack_paths(model_dir)
    fingerprint = _fingerprint(files)
    shape = shaping_config(config, adapter)
    if paths["index"].exists() and not force:
        existing = _current_pack(model_dir, paths, fingerprint, shape, verify, repair)
        if existing is not None:
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
    out = paths["dir"]
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths["index"].unlink(missing_ok=True)
    except OSError as exc:
        raise HarnessError(
            f"cannot write the pack of {model_dir} to {out} ({exc.strerror}); set HARNESS_CACHE to a writable folder"
        ) from None
    partial = out / (EXPERTS_FILE + ".partial")
    entries: list[ExpertEntry] = []
    total = len(layers) * num_experts
    padding = bytes(stride - expert_bytes)
    with open(partial, "wb") as sink:
        for layer in layers:
            for expert in range(num_experts):
                blob = _expert_tensors(adapter, handles, per_expert, fused, layer, expert, shapes)
                payload = b"".join(_raw_bytes(blob[t.name], dtype, f"layer {layer} expert {expert}") for t in tensors)
                entries.append(ExpertEntry(layer, expert, sink.tell(), expert_checksum(layer, expert, payload)))
                sink.write(payload)
                sink.write(padding)
                if progress:
                    progress(len(entries), total)
        sink.flush()
        os.fsync(sink.fileno())
    dense_tensors = {name: _get(handles, where).contiguous() for name, where in sorted(dense.items())}
    save_file(dense_tensors, str(paths["dense"]))
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
        source_config=shape,
        dense_xxh3=file_digest(paths["dense"]),
    )
    verify_expert_file(partial, index)
    partial.replace(paths["experts"])
    index.save(paths["index"])
    return index, True


def _current_pack(
    model_dir: Path,
    paths: dict[str, Path],
    fingerprint: dict[str, list[int]],
    shape: dict[str, object],
    verify: bool,
    repair: bool,
) -> PackIndex | None:
    """The existing pack when it is current, None when it must be re-packed; raises when it must be refused."""
    try:
        existing = PackIndex.load(paths["index"])
    except HarnessError as exc:
        log.warning("re-packing: %s", exc)
        return None
    if existing.source_fingerprint != fingerprint:
        log.info("re-packing %s: its checkpoint files changed since the pack was made", model_dir)
        return None
    check_config_unchanged(model_dir, existing.source_config, shape)
    if not paths["experts"].is_file():
        log.warning("re-packing %s: %s is missing", model_dir, paths["experts"])
        return None
    if verify:
        try:
            verify_expert_file(paths["experts"], existing)
        except HarnessError as exc:
            if not repair:
                raise
            log.warning("re-packing: the existing pack fails verification: %s", exc)
            return None
    return existing


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
