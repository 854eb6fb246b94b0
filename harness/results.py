"""Result files: atomic writes, environment capture, and the validity verdict (the typed result.json is
harness.result_model)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

_PACKAGES = ("harness", "torch", "transformers", "safetensors", "numpy", "pandas", "pyarrow", "psutil")


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write JSON to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(obj, handle, indent=2, sort_keys=False, default=_json_default)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def read_json(path: str | Path) -> Any:
    with open(path) as handle:
        return json.load(handle)


@dataclass
class Validity:
    """Whether a result's numbers mean what they say, with reasons and what to do about them."""

    valid: bool = True
    reasons: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)

    def fail(self, reason: str, suggestion: str | None = None) -> None:
        self.valid = False
        self.reasons.append(reason)
        if suggestion:
            self.suggestions.append(suggestion)

    def note(self, reason: str) -> None:
        """A caveat that does not invalidate the result."""
        self.reasons.append(f"note: {reason}")

    def to_dict(self) -> dict[str, Any]:
        return {"valid": self.valid, "reasons": self.reasons, "suggestions": self.suggestions}


def git_state(repo: Path | None = None) -> dict[str, Any]:
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=repo,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
        )
        return {"sha": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> dict[str, Any]:
    """GPUs seen by pynvml, or the reason there are none (never raises)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no driver, no library: a CPU-only machine
        return {"available": False, "reason": f"NVML unavailable: {exc.__class__.__name__}: {exc}"}
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append({"index": i, "name": pynvml.nvmlDeviceGetName(handle), "memory_bytes": mem.total})
        return {"available": bool(gpus), "driver": pynvml.nvmlSystemGetDriverVersion(), "gpus": gpus}
    finally:
        pynvml.nvmlShutdown()


def environment() -> dict[str, Any]:
    """What a reader needs to reproduce or compare a result: code, packages, CPU, GPU, kernel."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "git": git_state(),
        "python": platform.python_version(),
        "packages": versions,
        "host": platform.node(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "cpu": {
            "model": cpu_model(),
            "logical_cores": psutil.cpu_count(),
            "physical_cores": psutil.cpu_count(logical=False),
            "affinity": len(os.sched_getaffinity(0)),
        },
        "memory_total_bytes": psutil.virtual_memory().total,
        "gpu": gpu_info(),
    }
