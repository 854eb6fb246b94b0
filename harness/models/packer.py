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
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from harness.errors import HarnessError
from harness.models.adapters import (
    CheckpointPlan,
    experts_sites,
    load_config,
    non_expert_state,
    plan_checkpoint,
    skeleton,
    top_k_of,
    unsupported_reason,
)
from harness.models.locate import pack_paths
from harness.models.provenance import check_config_unchanged, file_digest, shaping_config, source_fingerprint
from harness.models.provenance import pack_content_hashes as pack_content_hashes  # run ids: light home is provenance
from harness.models.quant import (
    DEFAULT_GROUP_SIZE,
    MXFP4,
    MXFP4_BLOCK,
    QuantFormat,
    check_group_size,
    quant_format,
    quantize,
)
from harness.store.checksum import expert_checksum
from harness.store.layout import EXPERTS_FILE, SCALE_SUFFIX, ExpertEntry, PackIndex, TensorSlot, align_up
from harness.store.reader import verify_expert_file

log = logging.getLogger(__name__)


def checkpoint_files(model_dir: Path) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise HarnessError(f"{model_dir} has no *.safetensors weights (only safetensors checkpoints are supported)")
    return files


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
    expert_dtype: str | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    verify: bool = True,
    repair: bool = False,
) -> tuple[PackIndex, bool]:
    """Pack `model_dir`; returns (index, whether anything was written). Idempotent: a complete pack of the
    same checkpoint files and expert format, whose every blob passes its checksum (`verify`), is kept as it
    is. A pack of an older format or of changed checkpoint files is re-packed. A pack whose bytes fail
    verification is re-packed with `repair` (`harness model pack`), else refused (a run). A config.json
    changed since packing is refused unless `force`. `expert_dtype` int8 or int4 quantizes the expert
    weights (harness.models.quant); None keeps them as the checkpoint stores them, or keeps an existing
    pack's format."""
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    fmt = quant_format(expert_dtype) if expert_dtype not in (None, "", "checkpoint") else None
    files = checkpoint_files(model_dir)
    paths = pack_paths(model_dir)
    fingerprint = source_fingerprint(files)
    shape = shaping_config(config)
    if paths["index"].exists() and not force:
        existing = _current_pack(model_dir, paths, fingerprint, shape, verify, repair)
        same_format = existing is not None and (
            expert_dtype is None
            or (
                existing.expert_dtype == (fmt.name if fmt else existing.dtype)
                and (fmt is None or existing.group_size == group_size)
            )
        )
        if existing is not None and same_format:
            return existing, False
    model = skeleton(config)
    reason = unsupported_reason(model)
    if reason:
        raise HarnessError(f"{model_dir} ({config.model_type}) cannot run offloaded: {reason}")
    source = _source(model_dir, files, model, config)
    if isinstance(source, _LazySource) and source.mxfp4:
        if fmt is not None:
            raise HarnessError(
                f"{model_dir} holds MXFP4 experts: they are packed in their own format (drop --expert-dtype)"
            )
        fmt, group_size = MXFP4, MXFP4_BLOCK
    sites = source.sites
    layers = sorted(sites)
    num_experts = sites[layers[0]].num_experts
    sample = source.expert(layers[0], 0)
    # An MXFP4 expert's weights are uint8 codes: its biases give the compute dtype, else bf16 (what transformers
    # dequantizes MXFP4 to).
    dtype = next((t.dtype for t in sample.values() if t.is_floating_point()), torch.bfloat16)
    tensors, offset = [], 0
    for name, value in _parts(sample, dtype, fmt, group_size, f"layer {layers[0]} expert 0"):
        nbytes = value.numel() * value.element_size()
        stored_dtype = None if value.dtype == dtype else str(value.dtype).removeprefix("torch.")
        tensors.append(TensorSlot(name, list(value.shape), offset, nbytes, stored_dtype))
        offset += nbytes
    # Weights, not stored values: an MXFP4 byte holds two (its scales are not weights).
    weights = sum(
        t.numel() * (2 if fmt is MXFP4 and name + SCALE_SUFFIX in sample else 1)
        for name, t in sample.items()
        if not name.endswith(SCALE_SUFFIX)
    )
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
                blob = source.expert(layer, expert)
                payload = _encode(blob, dtype, fmt, group_size, f"layer {layer} expert {expert}")
                entries.append(ExpertEntry(layer, expert, sink.tell(), expert_checksum(layer, expert, payload)))
                sink.write(payload)
                sink.write(padding)
                if progress:
                    progress(len(entries), total)
        sink.flush()
        os.fsync(sink.fileno())
    dense_tensors = source.dense()
    save_file(dense_tensors, str(paths["dense"]))
    index = PackIndex(
        model_type=config.model_type,
        dtype=str(dtype).removeprefix("torch."),
        num_experts=num_experts,
        top_k=top_k_of(config),
        moe_layers=layers,
        expert_bytes=expert_bytes,
        stride_bytes=stride,
        tensors=tensors,
        entries=entries,
        dense_bytes=sum(t.numel() * t.element_size() for t in dense_tensors.values()),
        source_fingerprint=fingerprint,
        source_config=shape,
        dense_xxh3=file_digest(paths["dense"]),
        expert_dtype=fmt.name if fmt else str(dtype).removeprefix("torch."),
        group_size=group_size if fmt else None,
        bits_per_weight=round(8 * sum(t.nbytes for t in tensors) / weights, 4),
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


def _parts(
    blob: dict[str, torch.Tensor], dtype: torch.dtype, fmt: QuantFormat | None, group_size: int, what: str
) -> list[tuple[str, torch.Tensor]]:
    """An expert's tensors in blob order as stored: a quantized 2D weight is followed by its scales."""
    parts = []
    for name, tensor in blob.items():
        if fmt is MXFP4 and (name.endswith(SCALE_SUFFIX) or name + SCALE_SUFFIX in blob):
            parts.append((name, tensor))  # MXFP4 blocks and scales, kept in the checkpoint's own format
            continue
        if tensor.dtype != dtype:
            raise HarnessError(f"{what}: {name} has dtype {tensor.dtype}, the other expert tensors {dtype}")
        if fmt is not None and fmt is not MXFP4 and tensor.dim() == 2:
            check_group_size(tensor.shape[1], group_size, name)
            stored, scale = quantize(tensor, fmt, group_size)
            parts += [(name, stored), (name + SCALE_SUFFIX, scale)]
        else:
            parts.append((name, tensor))
    return parts


def _encode(
    blob: dict[str, torch.Tensor], dtype: torch.dtype, fmt: QuantFormat | None, group_size: int, what: str
) -> bytes:
    """An expert's payload: the bytes of its stored tensors, in blob order."""
    parts = _parts(blob, dtype, fmt, group_size, what)
    return b"".join(value.contiguous().view(torch.uint8).numpy().tobytes() for _, value in parts)


class _LazySource:
    """Expert and non-expert tensors read one at a time from the safetensors files (a model larger than RAM packs)."""

    def __init__(
        self, handles: dict[Path, object], where: dict[str, Path], plan: CheckpointPlan, model, mxfp4: set[str]
    ) -> None:
        self.handles, self.where, self.plan, self.mxfp4 = handles, where, plan, mxfp4
        """`mxfp4`: stacked keys stored as MXFP4 `{key}_blocks` and `{key}_scales` (gpt-oss)."""
        self.sites = experts_sites(model)

    def _get(self, key: str, index: int | None = None) -> torch.Tensor:
        return _get(self.handles, (self.where[key], key), index)

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        site = self.sites[layer]
        roles = self.plan.per_expert.get((layer, expert))
        if roles is None:
            blob = {}
            for name in site.params:
                key = self.plan.stacked[(layer, name)]
                if key not in self.mxfp4:
                    blob[name] = self._get(key, expert)
                    continue
                # Shapes checked when planned (_mxfp4_keys): blocks [out, in/32, 16], scales [out, in/32].
                blob[name] = self._get(key + "_blocks", expert)
                blob[name + SCALE_SUFFIX] = self._get(key + "_scales", expert)
        else:
            gate, up, down = (self._get(roles[r]) for r in ("gate", "up", "down"))
            blob = {"gate_up_proj": torch.cat([gate, up], dim=0), "down_proj": down}
        for name, tensor in blob.items():
            if name + SCALE_SUFFIX in blob or name.endswith(SCALE_SUFFIX):
                continue
            if list(tensor.shape) != site.params[name]:
                raise HarnessError(
                    f"layer {layer} expert {expert}: {name} has shape {list(tensor.shape)}, "
                    f"config.json implies {site.params[name]}"
                )
        return blob

    def dense(self) -> dict[str, torch.Tensor]:
        return {name: self._get(key).contiguous() for name, key in sorted(self.plan.dense.items())}


class _LoadedSource:
    """The checkpoint loaded by transformers (its own key conversions applied); needs the model's size in RAM."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        log.info("%s: checkpoint keys need transformers' conversion; loading the whole model to pack it", model_dir)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity(hf_logging.CRITICAL)  # its multi-line load report: the error below says it in one
        hf_logging.disable_progress_bar()
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype="auto")
        except (RuntimeError, ValueError, OSError) as exc:
            mismatch = "ignore_mismatched_sizes" in str(exc)
            first = "tensor sizes differ" if mismatch else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise HarnessError(
                f"{model_dir}: the checkpoint's weights do not fit its config.json ({first}); restore the config "
                "the weights were saved with"
            ) from None
        finally:
            hf_logging.set_verbosity(verbosity)
        self.sites = experts_sites(self.model)

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        module = self.sites[layer].module
        return {name: getattr(module, name).detach()[expert] for name in self.sites[layer].params}

    def dense(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().contiguous() for name, t in non_expert_state(self.model).items()}


def _source(model_dir: Path, files: list[Path], model, config) -> _LazySource | _LoadedSource:
    handles = {f: _open(f) for f in files}
    shapes: dict[str, list[int]] = {}
    where: dict[str, Path] = {}
    for path, handle in handles.items():
        for key in handle.keys():  # type: ignore[attr-defined]  # noqa: SIM118 - the handle is not iterable
            shapes[key] = list(handle.get_slice(key).get_shape())  # type: ignore[attr-defined]
            where[key] = path
    mxfp4 = _mxfp4_keys(model_dir, shapes, where, config)
    expected = {name: list(t.shape) for name, t in non_expert_state(model).items()}
    plan = plan_checkpoint(shapes, experts_sites(model), expected)
    if plan is None and mxfp4:
        raise HarnessError(f"{model_dir}: its MXFP4 expert tensors do not map onto the model's experts modules")
    if plan is None:
        return _LoadedSource(model_dir)
    return _LazySource(handles, where, plan, model, mxfp4)


def _mxfp4_keys(model_dir: Path, shapes: dict[str, list[int]], where: dict[str, Path], config) -> set[str]:
    """The expert weights stored as MXFP4 `{key}_blocks` + `{key}_scales`; each pair is replaced in `shapes` by
    `key` with the [E, in, out] shape it dequantizes to, so the checkpoint plan places it like any stacked tensor."""
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    blocks = [k for k in shapes if k.endswith("_blocks") and ".experts." in k]
    if bool(blocks) != (method == MXFP4.name):
        raise HarnessError(
            f"{model_dir}: config.json says quant_method {method!r} but the checkpoint holds "
            f"{'MXFP4 expert blocks' if blocks else 'no MXFP4 expert blocks (*_blocks, *_scales)'}"
        )
    keys = set()
    for key in blocks:
        base = key.removesuffix("_blocks")
        scales = shapes.pop(base + "_scales", None)
        experts, out_rows, groups, half = shapes.pop(key)
        if scales != [experts, out_rows, groups] or half * 2 != MXFP4_BLOCK:
            raise HarnessError(f"{model_dir}: {key} {[experts, out_rows, groups, half]} has no matching _scales")
        shapes[base], where[base] = [experts, groups * MXFP4_BLOCK, out_rows], where[key]
        keys.add(base)
    return keys
