"""`profile-ssd`: the job matrix (block size x queue depth x pattern), run on a test file or a raw device.

Each job reads with O_DIRECT after the file is dropped from the page cache; buffered reads are
measured beside them for comparison, writes only on the test file and only when asked. With fio,
the equivalent fio job runs right before or after each harness job (alternating, so a drifting
disk favours neither) and the ratio of their bandwidths is recorded per job.
"""

from __future__ import annotations

import json
import logging
import platform
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.iomem import base_page_note, thp_mode
from harness.models.locate import pack_paths
from harness.paths import check_output_file
from harness.results import Validity, environment, write_json_atomic
from harness.ssd import engine, fio
from harness.ssd.devices import VOLATILE_FILESYSTEMS, describe_block_device, describe_path
from harness.ssd.jobs import JobResult, JobSpec, merge_results
from harness.ssd.plots import write_plots
from harness.ssd.target import (
    check_folder,
    check_raw_device,
    create_test_file,
    remove_stale_test_files,
    remove_test_file,
    scratch_path,
)
from harness.store.layout import ALIGN_BYTES, align_up
from harness.units import format_bytes, parse_size

log = logging.getLogger(__name__)

PROFILE_SCHEMA = "harness.ssd-profile"
PROFILE_SCHEMA_VERSION = 1
DEFAULT_PROFILES_DIR = Path("hardware_profiles")
# Upper bound on buffers in flight (block size x queue depth) for one job (bytes); larger
# combinations (a 350 MiB Mixtral expert at depth 32) are skipped and listed.
MAX_INFLIGHT_BYTES = 1024**3
# A job is flagged when the harness and fio disagree by more than this (fraction).
FIO_AGREEMENT_TOLERANCE = 0.10
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "int8": 1}


@dataclass
class ProfileRequest:
    """What the user asked for; the effective settings are recorded beside it in the profile."""

    path: Path | None
    device: str | None
    size_bytes: int
    block_sizes: list[int]
    queue_depths: list[int]
    runtime_s: float
    ramp_s: float
    min_ios: int
    write: bool = False
    with_fio: bool = False
    buffered: bool = True
    direct: str = "required"  # "required": refuse without O_DIRECT; "auto": fall back to buffered + fadvise
    io_backend: str = "auto"  # "auto": io_uring where it works, else threads; or one of engine.BACKENDS
    expert_bytes: int | None = None
    out: Path | None = None
    profiles_dir: Path = DEFAULT_PROFILES_DIR
    seed: int = 0
    rounds: int = 1  # each job runs this many times, harness and fio alternating; the slices are merged
    buffers: int | None = None
    """The harness's requests rotate over this many block buffers (`engine.run_job`), as a cache's reads land in
    many slots; None: one buffer per request in flight, as fio."""
    labels: dict[int, str] = field(default_factory=dict)  # block size -> how it was asked for ("expert")

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path) if self.path else None,
            "device": self.device,
            "size_bytes": self.size_bytes,
            "block_sizes_bytes": self.block_sizes,
            "queue_depths": self.queue_depths,
            "runtime_s": self.runtime_s,
            "ramp_s": self.ramp_s,
            "min_ios": self.min_ios,
            "write": self.write,
            "fio": self.with_fio,
            "buffered": self.buffered,
            "direct": self.direct,
            "io_backend": self.io_backend,
            "expert_bytes": self.expert_bytes,
            "rounds": self.rounds,
            "buffers": self.buffers,
        }


def expert_bytes_from_model(model_dir: str | Path) -> int:
    """Bytes the store reads for one expert of the model in `model_dir`, 4 KiB aligned.

    From the packed index (`index.json` of the pack, stride_bytes) when the model is packed; else from
    config.json: hidden_size x (moe_intermediate_size or intermediate_size) x 3 matrices (gate,
    up, down) x the dtype's bytes, rounded up to the packer's alignment.
    """
    index_path = pack_paths(Path(model_dir))["index"]
    if index_path.is_file():
        return int(json.loads(index_path.read_text())["stride_bytes"])
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise HarnessError(f"--model {model_dir} has no config.json: give a checkpoint folder or --expert-size")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        config = None
    config = config.get("text_config", config) if isinstance(config, dict) else None
    if not isinstance(config, dict):
        raise HarnessError(f"{config_path} is not a JSON object: give a checkpoint folder or --expert-size")
    hidden = config.get("hidden_size")
    inter = (
        config.get("moe_intermediate_size")
        or config.get("expert_intermediate_size")
        or config.get("ffn_dim")
        or config.get("intermediate_size")
    )
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    if (
        not isinstance(hidden, int)
        or not isinstance(inter, int)
        or hidden < 1
        or inter < 1
        or dtype not in _DTYPE_BYTES
    ):
        raise HarnessError(f"cannot derive the expert size from {config_path}; give --expert-size instead")
    return align_up(3 * hidden * inter * _DTYPE_BYTES[dtype])


def parse_block_sizes(text: str, expert_bytes: int | None) -> tuple[list[int], dict[int, str]]:
    """'4KiB,1MiB,expert' -> sizes in bytes (sorted, unique) and labels for the named ones."""
    sizes: list[int] = []
    labels: dict[int, str] = {}
    for token in (t.strip() for t in text.split(",") if t.strip()):
        if token.lower() == "expert":
            if expert_bytes is None:
                raise HarnessError("block size 'expert' needs --model DIR or --expert-size SIZE")
            size = align_up(expert_bytes)
            labels[size] = "expert"
        else:
            size = parse_size(token)
        if size <= 0 or size % 512:
            raise HarnessError(f"block size {token!r} is not a positive multiple of 512 bytes, as O_DIRECT needs")
        sizes.append(size)
    if not sizes:
        raise HarnessError("--block-size names no size")
    return sorted(set(sizes)), labels


def parse_queue_depths(text: str) -> list[int]:
    try:
        depths = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError as exc:
        raise HarnessError(f"--queue-depth {text!r}: give whole numbers such as 1,4,16") from exc
    if not depths or depths[0] < 1:
        raise HarnessError("--queue-depth needs whole numbers of at least 1")
    return depths


def build_jobs(req: ProfileRequest, direct: bool, raw: bool) -> tuple[list[JobSpec], list[str]]:
    """The job matrix, and the combinations left out with the reason."""
    jobs: list[JobSpec] = []
    skipped: list[str] = []

    def spec(rw: str, bs: int, qd: int, is_direct: bool) -> JobSpec:
        return JobSpec(rw, bs, qd, is_direct, req.runtime_s, req.ramp_s, req.min_ios)

    for bs in req.block_sizes:
        if bs > req.size_bytes:
            skipped.append(f"bs {bs}: larger than the {req.size_bytes}-byte region")
            continue
        for qd in req.queue_depths:
            if bs * qd > MAX_INFLIGHT_BYTES:
                skipped.append(f"bs {bs} x qd {qd}: more than {format_bytes(MAX_INFLIGHT_BYTES)} in flight")
                continue
            for rw in ("read", "randread"):
                jobs.append(spec(rw, bs, qd, direct))
        if req.buffered and direct:
            for rw in ("read", "randread"):
                jobs.append(spec(rw, bs, 1, False))
    if req.write and not raw:
        for bs in req.block_sizes:
            for qd in req.queue_depths:
                if bs <= req.size_bytes and bs * qd <= MAX_INFLIGHT_BYTES:
                    jobs.extend(spec(rw, bs, qd, direct) for rw in ("write", "randwrite"))
    return jobs, skipped


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread, so the same cleanup runs for both."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


ProgressFn = Callable[[int, int, str], None]


def run_profile(req: ProfileRequest, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Measure, write the profile (+ fio JSON and plots) and return the profile document.

    The test file is removed on every way out: success, error, Ctrl-C or SIGTERM.
    """
    progress = on_progress or (lambda done, total, label: None)
    backend = engine.resolve_backend(req.io_backend)
    check_buffers(req, backend)
    raw = req.device is not None
    if raw:
        assert req.device is not None
        device_bytes = check_raw_device(req.device)
        region = device_bytes // ALIGN_BYTES * ALIGN_BYTES
        req.size_bytes = min(req.size_bytes, region) if req.size_bytes else region
        direct = True
        identity = describe_block_device(req.device)
    else:
        assert req.path is not None
        folder = req.path
        direct_ok = check_folder(folder, req.size_bytes, direct_required=req.direct == "required")
        direct = direct_ok
        identity = describe_path(folder)
        if identity.get("filesystem") in VOLATILE_FILESYSTEMS:
            raise HarnessError(
                f"--path {folder} is on {identity['filesystem']}, which is memory: a profile of it would not "
                "describe an SSD; name a folder on the SSD"
            )
        remove_stale_test_files(folder)
    out = check_output_file(profile_path_for(req, identity), "profile")
    jobs, skipped = build_jobs(req, direct, raw)
    if not jobs:
        raise HarnessError("no job left to run: every block size is larger than --size or too large for its depth")
    fio_version = fio.fio_version() if req.with_fio else None
    if req.with_fio and fio_version is None:
        raise HarnessError("--fio needs fio on PATH: install it (apt-get install fio) or run without --fio")

    test_file: Path | None = None
    with _sigterm_as_interrupt():
        try:
            if raw:
                assert req.device is not None
                target = req.device
            else:
                test_file = scratch_path(folder)
                progress(0, len(jobs) + 1, f"writing {format_bytes(req.size_bytes)} test file")
                create_test_file(test_file, req.size_bytes, seed=req.seed)
                target = str(test_file)
            ioengine = fio.probe_ioengine(target, req.size_bytes, min(req.block_sizes)) if req.with_fio else None
            results, fio_docs, pairs = _run_jobs(jobs, target, req, backend, ioengine, raw, progress)
        finally:
            if test_file is not None:
                remove_test_file(test_file)
    doc = _profile_document(req, identity, direct, raw, backend, results, pairs, skipped, fio_version, ioengine)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fio_docs:
        doc["fio_output"] = str(write_json_atomic(out.with_suffix(".fio.json"), fio_docs))
    doc["plots"] = [str(p) for p in write_plots(doc, out)]
    write_json_atomic(out, doc)
    doc["profile_path"] = str(out)
    return doc


def check_buffers(req: ProfileRequest, backend: str) -> None:
    """Refuse `--buffers` where it cannot hold: rotating buffers are an io_uring ring's, every depth needs one per
    request in flight, and fio (one buffer per request in flight) could not check such a job."""
    if req.buffers is None:
        return
    if backend != "io_uring":
        raise HarnessError(f"--buffers rotates the requests of an io_uring ring; this profile reads with {backend}")
    if req.buffers < max(req.queue_depths):
        raise HarnessError(
            f"--buffers {req.buffers} is fewer than --queue-depth {max(req.queue_depths)}: every request in flight "
            "needs its own buffer"
        )
    if req.buffers * max(req.block_sizes) > MAX_INFLIGHT_BYTES:
        raise HarnessError(
            f"--buffers {req.buffers} x the largest block size {format_bytes(max(req.block_sizes))} is more than "
            f"{format_bytes(MAX_INFLIGHT_BYTES)} of buffers; use fewer buffers or smaller blocks"
        )
    if req.with_fio:
        raise HarnessError(
            "--buffers with --fio: fio reads into one buffer per request in flight, so it cannot check a job whose "
            "reads rotate over more; profile without one of them"
        )


Pairs = dict[str, list[dict[str, Any]]]
"""Per job name, one entry per round: who ran first and each engine's bandwidth in that round."""


def _run_jobs(
    jobs: list[JobSpec],
    target: str,
    req: ProfileRequest,
    backend: str,
    ioengine: str | None,
    raw: bool,
    progress: ProgressFn,
) -> tuple[list[JobResult], list[dict[str, Any]], Pairs]:
    results: list[JobResult] = []
    fio_docs: list[dict[str, Any]] = []
    pairs: Pairs = {}
    total = len(jobs) + 1
    for i, spec in enumerate(jobs):
        progress(i + 1, total, spec.name)
        slices: dict[str, list[JobResult]] = {"harness": [], "fio": []}
        for round_ in range(req.rounds):
            # Alternate who goes first, per job and per round, so a drifting disk favours neither.
            steps = ["harness", "fio"] if (i + round_) % 2 == 0 else ["fio", "harness"]
            # A new random sequence per round, for fio too: repeating one would let it re-read blocks
            # a cache below the guest (a VM host's page cache) still holds.
            seed = req.seed + i + round_
            for step in steps:
                if step == "fio" and ioengine is None:
                    continue
                if step == "harness":
                    slices["harness"].append(
                        engine.run_job(spec, target, req.size_bytes, seed=seed, backend=backend, buffers=req.buffers)
                    )
                else:
                    assert ioengine is not None
                    # fio's synchronous engine matches a buffered depth-1 job; async engines need O_DIRECT.
                    job_engine = ioengine if spec.direct else "psync"
                    readonly = raw or not spec.is_write
                    cmd = fio.fio_command(
                        spec, target, req.size_bytes, ioengine=job_engine, readonly=readonly, seed=seed
                    )
                    fio_doc, fio_result = fio.run_fio(cmd, spec)
                    slices["fio"].append(fio_result)
                    env = {"GLIBC_TUNABLES": fio.fio_env()["GLIBC_TUNABLES"]}
                    fio_docs.append({"job": spec.name, "round": round_, "command": cmd, "env": env, "output": fio_doc})
            if ioengine is not None:
                pairs.setdefault(spec.name, []).append(
                    {
                        "round": round_,
                        "first": steps[0],
                        "harness_bw_bytes_per_s": slices["harness"][-1].bw_bytes_per_s,
                        "fio_bw_bytes_per_s": slices["fio"][-1].bw_bytes_per_s,
                    }
                )
        results.extend(merge_results(parts) for parts in slices.values() if parts)
    progress(total, total, "done")
    return results, fio_docs, pairs


def profile_path_for(req: ProfileRequest, identity: dict[str, Any]) -> Path:
    """hardware_profiles/<host>/<disk>.json, or --out."""
    if req.out is not None:
        return req.out
    name = identity.get("disk") or identity.get("filesystem") or "unknown"
    return req.profiles_dir / platform.node() / f"{name}.json"


def comparisons(results: list[JobResult], pairs: Pairs) -> list[dict[str, Any]]:
    """Harness vs fio per job: bandwidth, p50/p99 latency, the bandwidth ratio (harness / fio) of the
    merged rounds, and the median of the per-round ratios (each round's two runs back to back, so a
    device that drifts between rounds moves both sides of a ratio together)."""
    by_name: dict[str, dict[str, JobResult]] = {}
    for r in results:
        by_name.setdefault(r.spec.name, {})[r.engine] = r
    rows = []
    for name, pair in by_name.items():
        if "harness" not in pair or "fio" not in pair:
            continue
        h, f = pair["harness"], pair["fio"]
        ratio = h.bw_bytes_per_s / f.bw_bytes_per_s if f.bw_bytes_per_s else None
        rounds = [r for r in pairs.get(name, []) if r["fio_bw_bytes_per_s"]]
        per_round = [r["harness_bw_bytes_per_s"] / r["fio_bw_bytes_per_s"] for r in rounds]
        rows.append(
            {
                "job": name,
                "rw": h.spec.rw,
                "bs_bytes": h.spec.bs_bytes,
                "iodepth": h.spec.iodepth,
                "direct": h.spec.direct,
                "harness_bw_bytes_per_s": h.bw_bytes_per_s,
                "fio_bw_bytes_per_s": f.bw_bytes_per_s,
                "bw_ratio": ratio,
                "round_ratios": per_round,
                "round_ratio_median": statistics.median(per_round) if per_round else None,
                "harness_lat_p50_s": h.percentiles_s.get(50.0),
                "fio_lat_p50_s": f.percentiles_s.get(50.0),
                "harness_lat_p99_s": h.percentiles_s.get(99.0),
                "fio_lat_p99_s": f.percentiles_s.get(99.0),
                "within_tolerance": ratio is not None and abs(ratio - 1) <= FIO_AGREEMENT_TOLERANCE,
            }
        )
    return rows


def _profile_document(
    req: ProfileRequest,
    identity: dict[str, Any],
    direct: bool,
    raw: bool,
    backend: str,
    results: list[JobResult],
    pairs: Pairs,
    skipped: list[str],
    fio_version: str | None,
    ioengine: str | None,
) -> dict[str, Any]:
    validity = Validity()
    if not direct:
        validity.note("O_DIRECT unsupported here: reads are buffered after dropping the file from the page cache")
    for combination in skipped:
        validity.note(f"skipped {combination}")
    for r in results:
        if r.ios == 0:
            validity.fail(f"{r.engine} job {r.spec.name} completed no I/O after its ramp", "use a longer --runtime")
    shares = [r.huge_page_share for r in results if r.huge_page_share is not None]
    huge_note = base_page_note(min(shares), "the I/O buffers of the least-backed job") if shares else None
    if direct and huge_note:
        validity.note(huge_note)
    rows = comparisons(results, pairs)
    for row in rows:
        if not row["within_tolerance"] and row["direct"]:
            validity.note(f"{row['job']}: harness/fio bandwidth ratio {row['bw_ratio']:.2f}")
    try:
        harness_version = metadata.version("harness")
    except metadata.PackageNotFoundError:
        harness_version = None
    return {
        "schema": PROFILE_SCHEMA,
        "schema_version": PROFILE_SCHEMA_VERSION,
        "created_unix_s": time.time(),
        "host": platform.node(),
        "device": identity,
        "target": {
            "kind": "raw-device-readonly" if raw else "test-file",
            "region_bytes": req.size_bytes,
            "test_file_removed": not raw,
        },
        "requested": req.to_dict(),
        "effective": {
            "direct": direct,
            "backend": backend,
            "backend_note": engine.BACKEND_NOTES[backend],
            "fio_ioengine": ioengine,
            "transparent_huge_pages": thp_mode(),
            "block_sizes_bytes": sorted({r.spec.bs_bytes for r in results}),
            "block_size_labels": {str(k): v for k, v in req.labels.items()},
        },
        "tools": {
            "harness": harness_version,
            "fio": fio_version,
            "python": platform.python_version(),
            "kernel": platform.release(),
        },
        "environment": environment(),
        "jobs": [r.to_dict() for r in results],
        "fio_comparison": rows,
        "fio_rounds": pairs,
        "validity": validity.to_dict(),
    }
