"""The I/O floor of a decode run: how far its time per token is from what the hardware allows.

A decode token cannot take less than its compute with every needed expert resident, nor less than the
SSD needs to read the token's expert bytes at the profiled bandwidth (expert-sized reads at the run's
queue depth). `decode_floor_ratio` = measured steady decode seconds per token / max(those two); 1.0
means the run hides all its reads behind compute (or all compute behind reads).

The compute per token is measured once per (model pack, prompts, machine and device, decode settings)
with the fully resident model, and cached as a small JSON file under `$HARNESS_COMPUTE_CACHE`, else
`$HARNESS_CACHE/compute/` (default `$XDG_CACHE_HOME/harness/compute/`, else `~/.cache/harness/compute/`); the result
says whether it was measured now, read from the cache (and when it was measured: a machine whose speed drifts, as a
VM's can by a third over hours, makes an old figure wrong; the floor benchmark measures it again in each cell), or is
unavailable and why. A measurement records the machine's load while it ran
(this process's CPU time against wall time, the share of all CPUs' time other processes took, the 1-minute
load average); one taken while others took more than OTHERS_CPU_SHARE_MAX is used for its own run, said to be
under load, and never cached (the next run measures again): a slow figure would lower every later decode_floor_ratio.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.paths import harness_cache_dir
from harness.results import read_json, write_json_atomic
from harness.ssd.readtime import ReadTimeModel

log = logging.getLogger(__name__)

COMPUTE_CACHE_SCHEMA = "harness.compute/2"
"""Version 2 records the machine's load during the measurement; a version-1 file (load unknown) is not trusted."""
OTHERS_CPU_SHARE_MAX = 0.10
"""Most of all logical CPUs' time other processes (and the hypervisor's steal) may take during a compute
measurement for it to be cached: past it, the model's threads competed for cores and its figure is slow.
10% is one busy core of ten: on a 16-core desktop a browser tab passes, a second benchmark does not."""
RESIDENT_MARGIN = 1.5
"""The compute time is measured only when available memory holds this many times the model's bytes
(weights, plus activations, KV cache and loading overhead)."""


COMPUTE_CACHE_ENV = "HARNESS_COMPUTE_CACHE"
"""A folder for the cached compute figures alone (the floor benchmark gives each cell, or each round, its own, so that
each measures the compute again), instead of the harness cache's `compute/`."""


def compute_cache_dir() -> Path:
    explicit = os.environ.get(COMPUTE_CACHE_ENV)
    return Path(explicit).expanduser() if explicit else harness_cache_dir() / "compute"


def measured_when(stamp: str | None, now: datetime | None = None) -> str:
    """When a cached figure was measured and how long ago, for its source line: 'measured 2026-11-29T14:02Z,
    23.7 h ago'; 'measured at an unknown time' for a file written before the time was recorded."""
    if stamp is None:
        return "measured at an unknown time"
    try:
        then = datetime.fromisoformat(stamp)
    except ValueError:
        return "measured at an unknown time"
    hours = ((now or datetime.now(UTC)) - then).total_seconds() / 3600
    return f"measured {then:%Y-%m-%dT%H:%MZ}, {hours:.1f} h ago"


@dataclass(frozen=True)
class CpuSample:
    """CPU time read at one instant: this process's (all its threads), and the machine's busy and total time
    summed over every logical CPU (seconds)."""

    wall_s: float
    process_cpu_s: float
    busy_cpu_s: float
    total_cpu_s: float


def cpu_sample() -> CpuSample:
    """Now's CpuSample (psutil: /proc/stat and this process's stat on Linux)."""
    import psutil

    machine, own = psutil.cpu_times(), psutil.Process().cpu_times()
    # guest time is already counted in user; iowait is idle (a CPU waiting on a read runs nothing).
    total = sum(machine) - getattr(machine, "guest", 0.0) - getattr(machine, "guest_nice", 0.0)
    idle = machine.idle + getattr(machine, "iowait", 0.0)
    return CpuSample(time.monotonic(), own.user + own.system, total - idle, total)


@dataclass(frozen=True)
class MachineLoad:
    """The machine's load while a compute measurement ran."""

    wall_s: float
    process_cpu_s: float
    """This process's CPU time over the measurement (about wall_s x the threads it kept busy)."""
    others_cpu_share: float
    """Share of all CPUs' time that other processes (and steal) took: busy time less this process's, / total."""
    loadavg_1m: float
    """The 1-minute load average at the end (this process's threads included)."""

    @property
    def loaded(self) -> bool:
        return self.others_cpu_share > OTHERS_CPU_SHARE_MAX

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"under_load": self.loaded, "others_cpu_share_max": OTHERS_CPU_SHARE_MAX}


def machine_load(before: CpuSample, after: CpuSample) -> MachineLoad:
    total = after.total_cpu_s - before.total_cpu_s
    own = after.process_cpu_s - before.process_cpu_s
    others = max(0.0, after.busy_cpu_s - before.busy_cpu_s - own)
    return MachineLoad(after.wall_s - before.wall_s, own, others / total if total > 0 else 0.0, os.getloadavg()[0])


@dataclass(frozen=True)
class ComputeTime:
    """Decode compute seconds per token with every needed expert resident, and where the figure comes from."""

    s_per_token: float | None
    source: str
    """'measured now (cached in FILE)', 'measured now under load (...)', 'cached from FILE (...)', or
    'unavailable: WHY'."""
    load: MachineLoad | None = None
    """The machine's load while the figure was measured (None: unavailable)."""
    measured_at: str | None = None
    """When it was measured (ISO 8601, UTC); None: unavailable, or a cache file that did not record it."""


def compute_key(
    pack_index_file: Path, dense_file: Path, prompts: list[tuple[list[int], list[int] | None]], settings: dict[str, Any]
) -> str:
    """Hash of what decode compute depends on: the pack (its index, with every expert's checksum, and the
    non-expert file's size), the prompt (and teacher-forcing reference) tokens, this machine (host, CPU,
    torch threads) and `settings` (device, decode mode, tokens, warm-up)."""
    import torch

    from harness.results import environment

    env = environment()
    blob = {
        "index_sha256": hashlib.sha256(Path(pack_index_file).read_bytes()).hexdigest(),
        "dense_bytes": Path(dense_file).stat().st_size,
        "prompts": prompts,
        "host": env["host"],
        "cpu": env["cpu"]["model"],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def cached_compute(key: str) -> ComputeTime | None:
    path = compute_cache_dir() / f"{key}.json"
    if not path.is_file():
        return None
    try:
        doc = read_json(path)
    except (OSError, ValueError):
        return None
    if doc.get("schema") != COMPUTE_CACHE_SCHEMA or not isinstance(doc.get("s_per_token"), (int, float)):
        return None  # another version (a version-1 file does not say its load): measured again
    try:
        fields = {f: float(doc["load"][f]) for f in ("wall_s", "process_cpu_s", "others_cpu_share", "loadavg_1m")}
    except (KeyError, TypeError, ValueError):
        return None
    load = MachineLoad(**fields)
    if load.loaded:  # stored under a looser limit: measured again
        return None
    measured_at = doc.get("measured_at") if isinstance(doc.get("measured_at"), str) else None
    return ComputeTime(
        float(doc["s_per_token"]),
        f"cached from {path} ({measured_when(measured_at)}, while other processes took "
        f"{load.others_cpu_share:.0%} of the CPUs)",
        load,
        measured_at,
    )


def store_compute(key: str, s_per_token: float, steps: int, load: MachineLoad, measured_at: str) -> Path:
    path = compute_cache_dir() / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "schema": COMPUTE_CACHE_SCHEMA,
        "s_per_token": s_per_token,
        "steady_steps": steps,
        "measured_at": measured_at,
        "host": platform.node(),
        "load": load.to_dict(),
    }
    return write_json_atomic(path, doc)


def measure_compute(
    model_dir: Path,
    prompts: list[tuple[list[int], list[int] | None]],
    max_new_tokens: int,
    decode_mode: str,
    warmup_steps: int,
    device: str = "cpu",
    decode_threads: int | None = None,
) -> tuple[float, int] | None:
    """Steady decode seconds per token of the fully resident model on `prompts` on `device`, and the steps timed."""
    from harness.models.loader import into_process_memory, reference_model
    from harness.runtime.generation import generate

    model = reference_model(model_dir)
    # On the CPU the weights must be the process's own (not mapped from the checkpoint), or the figure could include
    # reading them; `to` another device copies them there.
    model = into_process_memory(model) if device == "cpu" else model.to(device)  # type: ignore[arg-type]
    steady: list[float] = []
    for ids, ref in prompts:
        log = generate(model, ids, max_new_tokens, decode_mode, ref, decode_threads=decode_threads)  # type: ignore[arg-type]
        steady += log.step_s[warmup_steps:]
    del model
    return (sum(steady) / len(steady), len(steady)) if steady else None


def compute_time(
    model_dir: Path,
    pack: dict[str, Path],
    prompts: list[tuple[list[int], list[int] | None]],
    settings: dict[str, Any],
    may_measure: str | None,
) -> ComputeTime:
    """The cached compute per token, else a measurement now (when `may_measure` is None; otherwise it says
    why not). `settings` needs max_new_tokens, decode_mode, warmup_steps and device, and may set decode_threads."""
    key = compute_key(pack["index"], pack["dense"], prompts, settings)
    found = cached_compute(key)
    if found is not None:
        return found
    if may_measure is not None:
        return ComputeTime(None, f"unavailable: {may_measure}")
    before = cpu_sample()
    measured = measure_compute(
        model_dir,
        prompts,
        settings["max_new_tokens"],
        settings["decode_mode"],
        settings["warmup_steps"],
        settings["device"],
        settings.get("decode_threads"),
    )
    load = machine_load(before, cpu_sample())
    if measured is None:
        return ComputeTime(None, "unavailable: no steady decode steps to time")
    now = datetime.now(UTC).isoformat(timespec="seconds")
    if load.loaded:
        log.warning(
            "compute time measured under load (others: %.0f%% of the CPUs): not cached", 100 * load.others_cpu_share
        )
        return ComputeTime(
            measured[0],
            f"measured now under load (other processes took {load.others_cpu_share:.0%} of the CPUs, over the "
            f"{OTHERS_CPU_SHARE_MAX:.0%} a cached figure allows): not cached, measured again by the next run",
            load,
            now,
        )
    try:
        path = store_compute(key, *measured, load, now)
    except OSError as exc:
        log.warning("cannot cache the compute time: %s", exc)
        return ComputeTime(measured[0], "measured now (not cached: the cache folder is not writable)", load, now)
    return ComputeTime(measured[0], f"measured now (cached in {path})", load, now)


def decode_floor(
    decode_s_per_token: float | None,
    decode_bytes_per_token: float | None,
    compute: ComputeTime,
    read_model: ReadTimeModel | None,
    block_bytes: int,
    queue_depth: int,
) -> dict[str, Any]:
    """The metrics `decode_floor_ratio` and `decode_floor` (its terms and their sources)."""
    bandwidth = read_model.bandwidth_bytes_per_s(block_bytes, queue_depth) if read_model is not None else None
    io_s = decode_bytes_per_token / bandwidth if bandwidth and decode_bytes_per_token is not None else None
    floor_s = max(compute.s_per_token, io_s) if compute.s_per_token is not None and io_s is not None else None
    ratio = decode_s_per_token / floor_s if decode_s_per_token is not None and floor_s else None
    return {
        "decode_floor_ratio": ratio,
        "decode_floor": {
            "floor_s_per_token": floor_s,
            "bound": None if floor_s is None else ("compute" if compute.s_per_token >= io_s else "io"),  # type: ignore[operator]
            "decode_s_per_token": decode_s_per_token,
            "compute_s_per_token": compute.s_per_token,
            "compute_source": compute.source,
            "compute_measured_at": compute.measured_at,
            "compute_under_load": None if compute.load is None else compute.load.loaded,
            "compute_load": None if compute.load is None else compute.load.to_dict(),
            "io_s_per_token": io_s,
            "io_source": read_model.source if read_model is not None else "unavailable: no SSD profile",
            "decode_bytes_per_token": decode_bytes_per_token,
            "ssd_bandwidth_bytes_per_s": bandwidth,
            "block_bytes": block_bytes,
            "queue_depth": queue_depth,
        },
    }


def run_floor_metrics(
    metrics: dict[str, Any],
    model_dir: Path,
    pack: dict[str, Path],
    prompts: list[tuple[list[int], list[int] | None]],
    settings: dict[str, Any],
    experts_file: Path,
    block_bytes: int,
    queue_depth: int,
    budget_enforced: bool,
) -> dict[str, Any]:
    """`decode_floor` of a run from its timing and byte metrics; measures the compute once if not cached
    (never under an enforced RAM budget, nor when the fully resident model would not fit in memory)."""
    import psutil

    from harness.ssd.readtime import load_profile_for_path
    from harness.store.layout import PackIndex

    tokens_per_s = metrics.get("decode_tokens_per_s")
    index = PackIndex.load(pack["index"])
    resident_bytes = index.dense_bytes + index.total_expert_bytes
    if settings["device"] == "cuda":
        import torch

        available = torch.cuda.mem_get_info()[0]  # the resident model is measured on the GPU
    else:
        available = psutil.virtual_memory().available
    why_not = None
    if budget_enforced:
        why_not = "the run is held to a RAM budget by a cgroup; run once without one to cache it"
    elif resident_bytes * RESIDENT_MARGIN > available:
        why_not = (
            f"the resident model ({resident_bytes / 2**30:.1f} GiB) does not fit in the available memory "
            f"({available / 2**30:.1f} GiB)"
        )
    compute = compute_time(model_dir, pack, prompts, settings, why_not)
    return decode_floor(
        1 / tokens_per_s if tokens_per_s else None,
        metrics.get("ssd_read_bytes_per_token"),
        compute,
        load_profile_for_path(experts_file),
        block_bytes,
        queue_depth,
    )
