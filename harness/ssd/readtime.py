"""The read-time model the rest of the harness uses instead of hard-coded disk speeds.

Built from a profile's own (harness-engine, O_DIRECT) read jobs: bandwidth and completion
latency measured on a grid of block size x queue depth. Between grid points it interpolates
linearly in log2(block size) and log2(queue depth); outside the grid it holds the edge value
(it never extrapolates a trend the disk was not seen to follow).
"""

from __future__ import annotations

import bisect
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.results import read_json
from harness.ssd.devices import block_device_for_path
from harness.ssd.jobs import percentile_key
from harness.ssd.profiler import DEFAULT_PROFILES_DIR, PROFILE_SCHEMA

Grid = dict[int, dict[int, float]]  # block size (bytes) -> queue depth -> value


def _interp_1d(points: dict[int, float], x: float) -> float:
    """Linear interpolation in log2(x) over measured points, clamped at both ends."""
    keys = sorted(points)
    if x <= keys[0]:
        return points[keys[0]]
    if x >= keys[-1]:
        return points[keys[-1]]
    hi = bisect.bisect_left(keys, x)
    lo = hi - 1
    if keys[hi] == x:
        return points[keys[hi]]
    t = (math.log2(x) - math.log2(keys[lo])) / (math.log2(keys[hi]) - math.log2(keys[lo]))
    return points[keys[lo]] + t * (points[keys[hi]] - points[keys[lo]])


def _interp_2d(grid: Grid, bs: float, qd: float) -> float:
    along_bs = {size: _interp_1d(by_qd, qd) for size, by_qd in grid.items() if by_qd}
    return _interp_1d(along_bs, bs)


@dataclass
class ReadTimeModel:
    """Time to read bytes from one device, from its measured profile.

    `bw[pattern]` and `lat[pattern][percentile]` are grids block size -> queue depth -> value
    (bytes/s, seconds); pattern is "randread" (expert loads) or "read" (sequential streams).
    """

    bw: dict[str, Grid]
    lat: dict[str, dict[float, Grid]]
    source: str
    device: str | None

    @classmethod
    def from_document(cls, doc: dict[str, Any], source: str = "") -> ReadTimeModel:
        if doc.get("schema") != PROFILE_SCHEMA:
            raise HarnessError(f"{source or 'document'} is not an SSD profile (schema {doc.get('schema')!r})")
        bw: dict[str, Grid] = {}
        lat: dict[str, dict[float, Grid]] = {}
        for job in doc["jobs"]:
            if job["engine"] != "harness" or job["rw"] not in ("read", "randread") or job["ios"] == 0:
                continue
            if job["direct"] != doc["effective"]["direct"]:
                continue  # the buffered comparison jobs are not what a store read costs
            bs, qd = job["bs_bytes"], job["iodepth"]
            bw.setdefault(job["rw"], {}).setdefault(bs, {})[qd] = job["bw_bytes_per_s"]
            for p in (50.0, 90.0, 99.0, 99.9):
                value = job.get(percentile_key(p))
                if value is not None:
                    lat.setdefault(job["rw"], {}).setdefault(p, {}).setdefault(bs, {})[qd] = value
        if not bw:
            raise HarnessError(f"{source or 'profile'} has no read jobs to build a read-time model from")
        buffers = (doc.get("requested") or {}).get("buffers")  # published profiles record no request
        if buffers:  # the floor's I/O term says what kind of reads it assumes
            source += f" (reads rotating over {buffers} buffers)"
        return cls(bw=bw, lat=lat, source=source, device=doc.get("device", {}).get("disk"))

    @classmethod
    def from_profile(cls, path: str | Path) -> ReadTimeModel:
        return cls.from_document(read_json(path), source=str(path))

    def _pattern(self, pattern: str) -> str:
        if pattern in self.bw:
            return pattern
        # A profile with only one pattern still answers for the other, rather than failing a run.
        return next(iter(self.bw))

    def bandwidth_bytes_per_s(self, block_size: int, queue_depth: int = 1, pattern: str = "randread") -> float:
        """Interpolated bandwidth (bytes/s) for reads of `block_size` bytes with `queue_depth` in flight."""
        return _interp_2d(self.bw[self._pattern(pattern)], block_size, queue_depth)

    def latency_s(
        self, block_size: int, queue_depth: int = 1, percentile: float = 50.0, pattern: str = "randread"
    ) -> float:
        """Interpolated completion latency (s) of one read at that percentile (50, 90, 99 or 99.9)."""
        grids = self.lat.get(self._pattern(pattern), {})
        if percentile not in grids:
            raise HarnessError(f"the profile has no p{percentile:g} latency; use 50, 90, 99 or 99.9")
        return _interp_2d(grids[percentile], block_size, queue_depth)

    def seconds(
        self, nbytes: int, queue_depth: int = 1, block_size: int | None = None, pattern: str = "randread"
    ) -> float:
        """Seconds to read `nbytes` in reads of `block_size` (default: one read of nbytes) at `queue_depth`.

        Fewer reads than the queue depth cannot fill the queue, so the depth used is at most the
        number of reads.
        """
        if nbytes <= 0:
            return 0.0
        bs = block_size or nbytes
        n_reads = math.ceil(nbytes / bs)
        depth = max(1, min(queue_depth, n_reads))
        return nbytes / self.bandwidth_bytes_per_s(bs, depth, pattern)


def profile_for_path(path: str | Path, profiles_dir: Path = DEFAULT_PROFILES_DIR) -> Path | None:
    """hardware_profiles/<host>/<disk>.json for the disk that holds `path`, if such a profile exists."""
    disk = block_device_for_path(path)
    if disk is None:
        return None
    candidate = profiles_dir / platform.node() / f"{disk}.json"
    return candidate if candidate.is_file() else None


def load_profile_for_path(path: str | Path, profiles_dir: Path = DEFAULT_PROFILES_DIR) -> ReadTimeModel | None:
    """The read-time model of the disk that holds `path`, or None when it has not been profiled here."""
    found = profile_for_path(path, profiles_dir)
    return ReadTimeModel.from_profile(found) if found else None
