"""What one I/O job is (fio's vocabulary: rw, bs, iodepth, direct, runtime, ramp_time) and what it measured.

Latencies are kept as a log-linear histogram so that distributions from threads, repeats or
fio's json+ bins merge by adding counts; percentiles are read from the merged histogram,
never averaged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# 64 sub-buckets per power of two: a bucket is at most 1/64 (1.6 %) of its value wide, and
# values below 64 ns are exact. 4096 buckets reach 2**69 ns, far beyond any I/O.
SUB_BITS = 6
SUB_BUCKETS = 1 << SUB_BITS
N_BUCKETS = 64 * SUB_BUCKETS
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
READ_PATTERNS = ("read", "randread")
WRITE_PATTERNS = ("write", "randwrite")


def bucket_index(ns: int) -> int:
    """Histogram bucket of a latency in nanoseconds."""
    if ns < SUB_BUCKETS:
        return max(ns, 0)
    shift = ns.bit_length() - 1 - SUB_BITS
    return (shift + 1) * SUB_BUCKETS + (ns >> shift) - SUB_BUCKETS


def bucket_value_ns(index: int) -> float:
    """Midpoint (ns) of a bucket's range."""
    if index < SUB_BUCKETS:
        return float(index)
    shift = index // SUB_BUCKETS - 1
    low = (index % SUB_BUCKETS + SUB_BUCKETS) << shift
    return low + ((1 << shift) - 1) / 2


def percentile_key(p: float) -> str:
    """50 -> 'lat_p50_s', 99.9 -> 'lat_p99_9_s'."""
    text = f"{p:g}".replace(".", "_")
    return f"lat_p{text}_s"


@dataclass
class LatencyHistogram:
    """Completion latencies, counted in log-linear buckets (see bucket_index)."""

    counts: list[int] = field(default_factory=lambda: [0] * N_BUCKETS)

    def add_ns(self, ns: int, count: int = 1) -> None:
        self.counts[bucket_index(ns)] += count

    def merge(self, other: LatencyHistogram) -> None:
        for i, c in enumerate(other.counts):
            if c:
                self.counts[i] += c

    @property
    def total(self) -> int:
        return sum(self.counts)

    def percentile_s(self, p: float) -> float | None:
        """Smallest bucket value with at least p % of the samples at or below it, in seconds."""
        total = self.total
        if total == 0:
            return None
        rank = p / 100.0 * total
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if c and seen >= rank:
                return bucket_value_ns(i) * 1e-9
        raise AssertionError("unreachable: the cumulative count reaches the total")

    def to_sparse(self) -> dict[str, int]:
        """Non-empty buckets as {index: count} (JSON keys are strings)."""
        return {str(i): c for i, c in enumerate(self.counts) if c}

    @classmethod
    def from_sparse(cls, sparse: dict[str, int]) -> LatencyHistogram:
        hist = cls()
        for key, count in sparse.items():
            hist.counts[int(key)] += count
        return hist


@dataclass(frozen=True)
class JobSpec:
    """One job, as fio would name its settings."""

    rw: str
    bs_bytes: int
    iodepth: int
    direct: bool
    runtime_s: float
    ramp_s: float
    min_ios: int

    def __post_init__(self) -> None:
        if self.rw not in READ_PATTERNS + WRITE_PATTERNS:
            raise ValueError(f"unknown rw {self.rw!r}")
        if self.bs_bytes <= 0 or self.iodepth <= 0:
            raise ValueError("bs and iodepth must be positive")

    @property
    def is_write(self) -> bool:
        return self.rw in WRITE_PATTERNS

    @property
    def name(self) -> str:
        return f"{self.rw}-bs{self.bs_bytes}-qd{self.iodepth}-{'direct' if self.direct else 'buffered'}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "rw": self.rw,
            "bs_bytes": self.bs_bytes,
            "iodepth": self.iodepth,
            "direct": self.direct,
            "runtime_s": self.runtime_s,
            "ramp_s": self.ramp_s,
            "min_ios": self.min_ios,
        }


@dataclass
class JobResult:
    """What a job measured after its ramp, in SI units. `hist` is None for fio output without bins."""

    spec: JobSpec
    engine: str  # "harness" or "fio"
    backend: str  # how queue depth was reached: "threads", "io_uring", "libaio", "psync"
    ios: int
    bytes: int
    elapsed_s: float
    lat_mean_s: float | None
    lat_max_s: float | None
    percentiles_s: dict[float, float | None]
    hist: LatencyHistogram | None = None
    huge_page_share: float | None = None  # of the harness's I/O buffers; None for fio (not observable)

    @property
    def bw_bytes_per_s(self) -> float:
        return self.bytes / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def iops(self) -> float:
        return self.ios / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.spec.name, "engine": self.engine, "backend": self.backend}
        out.update(self.spec.to_dict())
        out.update(
            ios=self.ios,
            bytes=self.bytes,
            elapsed_s=self.elapsed_s,
            bw_bytes_per_s=self.bw_bytes_per_s,
            iops=self.iops,
            lat_mean_s=self.lat_mean_s,
            lat_max_s=self.lat_max_s,
            huge_page_share=self.huge_page_share,
        )
        for p in PERCENTILES:
            out[percentile_key(p)] = self.percentiles_s.get(p)
        if self.hist is not None:
            out["lat_hist"] = {"scheme": f"log2-linear-{SUB_BUCKETS}-ns", "buckets": self.hist.to_sparse()}
        return out


def percentiles_from(hist: LatencyHistogram) -> dict[float, float | None]:
    return {p: hist.percentile_s(p) for p in PERCENTILES}


def merge_results(parts: list[JobResult]) -> JobResult:
    """One result from slices of the same job (bytes, I/Os and time added; histograms merged).

    Percentiles come from the merged histogram; without histograms (fio json without bins) they
    cannot be merged honestly and are left out.
    """
    first = parts[0]
    ios = sum(p.ios for p in parts)
    hists = [p.hist for p in parts]
    hist: LatencyHistogram | None = None
    if all(h is not None for h in hists):
        hist = LatencyHistogram()
        for h in hists:
            assert h is not None
            hist.merge(h)
    means = [(p.lat_mean_s, p.ios) for p in parts if p.lat_mean_s is not None]
    maxima = [p.lat_max_s for p in parts if p.lat_max_s is not None]
    shares = [p.huge_page_share for p in parts]
    return JobResult(
        spec=first.spec,
        engine=first.engine,
        backend=first.backend,
        ios=ios,
        bytes=sum(p.bytes for p in parts),
        elapsed_s=sum(p.elapsed_s for p in parts),
        lat_mean_s=sum(m * n for m, n in means) / ios if means and ios else None,
        lat_max_s=max(maxima) if maxima else None,
        percentiles_s=percentiles_from(hist) if hist is not None else dict.fromkeys(PERCENTILES),
        hist=hist,
        huge_page_share=None if None in shares else min(shares),  # type: ignore[type-var]
    )
