"""Running fio for the same job as the harness, and reading its JSON into SI units once, here.

fio reports bandwidth in KiB/s (`bw`; `bw_bytes` is bytes/s), runtime in ms and latency in ns.
The parser turns that into a JobResult (bytes, seconds). With `--output-format=json+` fio adds
its latency histogram (`clat_ns.bins`: bucket value in ns -> count); those counts are merged into
our histogram so percentiles across threads or jobs come from one distribution.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.ssd.jobs import PERCENTILES, JobResult, JobSpec, LatencyHistogram, percentiles_from
from harness.units import parse_duration, parse_size

log = logging.getLogger(__name__)

# Seconds fio may take beyond the job's own ramp + runtime (start-up, file layout check, exit).
_FIO_GRACE_S = 60.0
# fio's buffers on huge pages, as the harness's are (harness.iomem explains why it matters): fio
# allocates them with malloc, glibc (2.35+) asks for transparent huge pages on large allocations with
# this tunable, and --iomem_align=2M both grows the allocation past one huge page and starts the
# buffers on a 2 MiB boundary. Older glibc ignores the tunable; fio then runs as it would by default.
HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"
FIO_BUFFER_ALIGN = "2M"


def fio_env() -> dict[str, str]:
    """fio's environment: ours, with the huge-page malloc tunable added to any the user set."""
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"), HUGE_PAGE_TUNABLE) if t)
    return env


def fio_path() -> str | None:
    return shutil.which("fio")


def fio_version() -> str | None:
    exe = fio_path()
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10, check=False)
    return out.stdout.strip() or None


def _escape(filename: str) -> str:
    # fio splits --filename on ':' (several files); a literal colon is written '\:'.
    return filename.replace(":", "\\:")


def fio_command(
    spec: JobSpec, filename: str, region_bytes: int, *, ioengine: str, readonly: bool, seed: int = 0
) -> list[str]:
    """The fio command line equivalent to `spec` on `filename` (the first `region_bytes` bytes)."""
    exe = fio_path() or "fio"
    cmd = [
        exe,
        f"--name={spec.name}",
        f"--filename={_escape(filename)}",
        f"--size={region_bytes}",
        f"--rw={spec.rw}",
        f"--bs={spec.bs_bytes}",
        f"--iodepth={spec.iodepth}",
        f"--ioengine={ioengine}",
        f"--direct={int(spec.direct)}",
        # Whole milliseconds: fio rejects or truncates fractional seconds such as '0.3s'.
        f"--runtime={max(round(spec.runtime_s * 1000), 1)}ms",
        f"--ramp_time={round(spec.ramp_s * 1000)}ms",
        "--time_based",
        "--invalidate=1",
        f"--randseed={seed}",
        "--percentile_list=" + ":".join(f"{p:g}" for p in PERCENTILES),
        "--output-format=json+",
        f"--iomem_align={FIO_BUFFER_ALIGN}",
    ]
    if readonly:
        cmd.append("--readonly")
    return cmd


def run_fio(cmd: list[str], spec: JobSpec) -> tuple[dict[str, Any], JobResult]:
    """Run one fio job; return its JSON document and the parsed result."""
    try:
        proc = subprocess.run(
            cmd,
            env=fio_env(),
            capture_output=True,
            text=True,
            check=False,
            timeout=spec.ramp_s + spec.runtime_s + _FIO_GRACE_S,
        )
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"fio did not finish job {spec.name} in time; run it by hand: {' '.join(cmd)}") from exc
    if proc.returncode != 0:
        raise HarnessError(f"fio failed on job {spec.name} (exit {proc.returncode}): {proc.stderr.strip()[:300]}")
    doc = json.loads(_json_part(proc.stdout))
    results = parse_fio_json(doc, spec=spec)
    if len(results) != 1:
        raise HarnessError(f"fio returned {len(results)} jobs for {spec.name}, expected 1")
    return doc, results[0]


def _json_part(stdout: str) -> str:
    # fio may print notes (e.g. "fio: file hash not empty") before the JSON document.
    start = stdout.find("{")
    if start < 0:
        raise HarnessError("fio printed no JSON output")
    return stdout[start:]


def probe_ioengine(filename: str, region_bytes: int, bs_bytes: int) -> str | None:
    """'io_uring' if fio can use it here, else 'libaio', else None (no fio)."""
    if fio_path() is None:
        return None
    for engine in ("io_uring", "libaio"):
        spec = JobSpec("randread", bs_bytes, 1, True, 0.1, 0.0, 1)
        cmd = fio_command(spec, filename, region_bytes, ioengine=engine, readonly=True)
        proc = subprocess.run(cmd, env=fio_env(), capture_output=True, text=True, check=False, timeout=_FIO_GRACE_S)
        if proc.returncode == 0:
            return engine
        log.info("fio ioengine %s unusable here: %s", engine, proc.stderr.strip()[:200])
    raise HarnessError("fio can use neither io_uring nor libaio on this machine; run without --fio")


def parse_fio_json(doc: dict[str, Any], spec: JobSpec | None = None) -> list[JobResult]:
    """Every job of a fio JSON document as a JobResult in SI units (reads, or writes for write jobs).

    Without `spec`, the job's settings are read from its `job options` (and the global options).
    """
    global_opts = doc.get("global options", {})
    results = []
    for job in doc["jobs"]:
        opts = {**global_opts, **job.get("job options", {})}
        job_spec = spec or _spec_from_options(opts)
        side = job["write"] if job_spec.is_write else job["read"]
        results.append(_parse_side(side, job_spec, opts))
    return results


def _spec_from_options(opts: dict[str, str]) -> JobSpec:
    return JobSpec(
        rw=opts.get("rw", opts.get("readwrite", "read")),
        bs_bytes=parse_size(opts.get("bs", "4k")),
        iodepth=int(opts.get("iodepth", "1")),
        direct=opts.get("direct", "0") in ("1", "true"),
        runtime_s=parse_duration(opts["runtime"]) if "runtime" in opts else 0.0,
        ramp_s=parse_duration(opts["ramp_time"]) if "ramp_time" in opts else 0.0,
        min_ios=0,
    )


def _parse_side(side: dict[str, Any], spec: JobSpec, opts: dict[str, str]) -> JobResult:
    clat = side.get("clat_ns", {})
    hist: LatencyHistogram | None = None
    if clat.get("bins"):
        hist = LatencyHistogram()
        for value_ns, count in clat["bins"].items():
            hist.add_ns(int(value_ns), int(count))
    if hist is not None:
        percentiles = percentiles_from(hist)
    else:
        table = clat.get("percentile", {})
        percentiles = {p: (table[f"{p:.6f}"] * 1e-9 if f"{p:.6f}" in table else None) for p in PERCENTILES}
    ios = int(side["total_ios"]) if "total_ios" in side else int(side["io_bytes"]) // spec.bs_bytes
    return JobResult(
        spec=spec,
        engine="fio",
        backend=opts.get("ioengine", "psync"),
        ios=ios,
        bytes=int(side["io_bytes"]),
        elapsed_s=int(side["runtime"]) * 1e-3,  # fio: ms
        lat_mean_s=float(clat["mean"]) * 1e-9 if "mean" in clat else None,  # fio: ns
        lat_max_s=float(clat["max"]) * 1e-9 if "max" in clat else None,
        percentiles_s=percentiles,
        hist=hist,
    )


def load_fio_json(path: str | Path) -> dict[str, Any]:
    return json.loads(_json_part(Path(path).read_text()))
