"""What a run is: its resolved spec plus the content it ran on and the machine it ran on -> run_id.

Cheap enough for the sweep parent (no torch import): file contents are hashed once per process and
remembered by (path, size, mtime); the machine fingerprint is read once per process.

`content_identity` is the one place that says what "the content" of a run is: the pack's own content
hashes (experts, non-expert weights, config, tokenizer) and the prompt file's bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

import harness
from harness.errors import HarnessError
from harness.models.locate import pack_paths
from harness.models.provenance import file_digest as provenance_digest
from harness.models.provenance import pack_content_hashes, source_fingerprint
from harness.results import cpu_model, gpu_info
from harness.store.layout import PackIndex

if TYPE_CHECKING:
    from harness.spec import RunSpec

MACHINE_ENV = "HARNESS_MACHINE_FINGERPRINT"
"""Set to pin the machine fingerprint (tests; or identical machines that should share results)."""
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
_ID_HEX = 16
_FINGERPRINT_HEX = 12


@dataclass(frozen=True)
class RunIdentity:
    """A run's id and what it was derived from (both recorded in result.json)."""

    run_id: str
    content: dict[str, str | None] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)


@cache
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """The pack's own file hash (`provenance.file_digest`, xxh3-128), cached by (path, size, mtime) so a
    process hashes each version once; the same hash as the pack records, so a config hashed here before
    packing equals the one `pack_content_hashes` gives after."""
    return provenance_digest(Path(path))


def file_digest(path: Path) -> str | None:
    """Content hash of one file, or None when it does not exist."""
    try:
        st = path.stat()
    except OSError:
        return None
    return _file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns) if path.is_file() else None


def _digest_of(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def content_identity(model_dir: Path | None, prompt_file: Path | None) -> dict[str, str | None]:
    """Checksums of what a run computes with: packed experts (from the index's per-expert checksums),
    non-expert weights, config, tokenizer (`harness.models.provenance.pack_content_hashes`), the prompt
    file, and the harness version. None where absent (no pack yet: the run packs it, and its result
    records the hashes then)."""
    hashes: dict[str, str | None] = {"experts": None, "dense": None, "config": None, "tokenizer": None}
    if model_dir is not None:
        try:
            hashes.update(pack_content_hashes(model_dir))
        except HarnessError:
            hashes["config"] = file_digest(model_dir / "config.json")
    return {
        **hashes,
        "prompts": file_digest(prompt_file) if prompt_file is not None else None,
        "harness": harness.__version__,
    }


def local_model_dir(model: str) -> Path | None:
    """The model's folder when `model` names one that exists here; None otherwise (an HF id is resolved
    by the run itself, which also records the folder)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model.count("/") == 1 and not model.startswith((".", "/")):
        # A Hugging Face id: resolving it needs only huggingface_hub (no torch). Imported lazily from the
        # module that owns the resolution so the two can never disagree.
        from harness.models.locate import resolve_model_dir

        try:
            return resolve_model_dir(model)
        except HarnessError:
            return None
    return None


@cache
def _gpu_names() -> tuple[str, ...]:
    return tuple(str(gpu["name"]) for gpu in gpu_info().get("gpus", []))


@cache
def _ssd_device(ssd: str | None) -> dict[str, str | None] | None:
    """Model and serial of the block device holding the SSD folder, from sysfs (cheap, no udev)."""
    if ssd is None:
        return None
    from harness.ssd.devices import block_device_for_path

    name = block_device_for_path(Path(ssd).expanduser())
    if name is None:
        return None
    disk = Path("/sys/block") / name

    def read(path: Path) -> str | None:
        try:
            return path.read_text().strip() or None
        except OSError:
            return None

    serial = read(disk / "serial") or read(disk / "device" / "serial")
    return {"name": name, "model": read(disk / "device" / "model"), "serial": serial}


def machine_identity(ssd: str | None = None) -> dict[str, Any]:
    """Hostname and a hardware fingerprint: CPU model, cores, RAM, GPU names, the SSD folder's device."""
    hardware = {
        "host": platform.node(),
        "cpu_model": cpu_model(),
        "logical_cores": psutil.cpu_count(),
        "memory_total_bytes": psutil.virtual_memory().total,
        "gpus": list(_gpu_names()),
        "ssd_device": _ssd_device(ssd),
    }
    pinned = os.environ.get(MACHINE_ENV)
    fingerprint = pinned or _digest_of(hardware)[:_FINGERPRINT_HEX]
    return {**hardware, "fingerprint": fingerprint, "fingerprint_source": "env" if pinned else "hardware"}


def run_identity(spec: RunSpec) -> RunIdentity:
    """run_id = hash(resolved spec, content checksums, machine fingerprint)."""
    from harness.workloads import prompt_file

    content = content_identity(local_model_dir(spec.model), prompt_file(spec))
    machine = machine_identity(spec.ssd)
    run_id = _digest_of({"spec": spec.canonical(), "content": content, "machine": machine["fingerprint"]})
    return RunIdentity(run_id[:_ID_HEX], content, machine)


def pack_looks_current(model_dir: Path) -> bool:
    """Whether `model_dir` has a pack made from its present checkpoint files (by name, size and mtime, as the
    packer records them) with an expert file of the indexed size; stat calls only, no torch."""
    paths = pack_paths(model_dir)
    try:
        index = PackIndex.load(paths["index"])
    except HarnessError:
        return False
    current = source_fingerprint(sorted(model_dir.glob("*.safetensors")))
    experts = paths["experts"]
    expected_bytes = index.stride_bytes * len(index.entries)
    return index.source_fingerprint == current and experts.is_file() and experts.stat().st_size == expected_bytes
