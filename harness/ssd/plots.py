"""PNG curves beside a profile: bandwidth vs queue depth per block size, and latency percentiles."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt

from harness.ssd.jobs import PERCENTILES, percentile_key
from harness.units import format_bytes

_PATTERNS = (("read", "sequential read"), ("randread", "random read"))


def _direct_jobs(doc: dict[str, Any], engine: str) -> list[dict[str, Any]]:
    return [j for j in doc["jobs"] if j["engine"] == engine and j["direct"] and j["rw"] in ("read", "randread")]


def _label(doc: dict[str, Any], bs: int) -> str:
    named = doc.get("effective", {}).get("block_size_labels", {}).get(str(bs))
    return f"{format_bytes(bs)} ({named})" if named else format_bytes(bs)


def _legend_or_note(ax: Any, note: str) -> None:
    """A legend for what the axes show, or `note` where they show nothing (a profile without those jobs)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, fontsize=8)


def write_plots(doc: dict[str, Any], profile_path: Path) -> list[Path]:
    """Write <stem>-bandwidth.png and <stem>-latency.png beside the profile; return their paths."""
    paths = [_bandwidth_plot(doc, profile_path.with_name(f"{profile_path.stem}-bandwidth.png"))]
    paths.append(_latency_plot(doc, profile_path.with_name(f"{profile_path.stem}-latency.png")))
    return paths


def _bandwidth_plot(doc: dict[str, Any], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    sizes = sorted({j["bs_bytes"] for j in _direct_jobs(doc, "harness")})
    for ax, (rw, title) in zip(axes, _PATTERNS, strict=True):
        for engine, style in (("harness", "-o"), ("fio", "--x")):
            jobs = [j for j in _direct_jobs(doc, engine) if j["rw"] == rw]
            for bs in sorted({j["bs_bytes"] for j in jobs}):
                points = sorted((j["iodepth"], j["bw_bytes_per_s"] / 1e6) for j in jobs if j["bs_bytes"] == bs)
                # One colour per block size, so harness (solid) and fio (dashed) pair up by eye.
                colour = f"C{sizes.index(bs) % 10}" if bs in sizes else None
                ax.plot(*zip(*points, strict=True), style, color=colour, label=f"{engine} {_label(doc, bs)}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("queue depth")
        ax.set_title(f"{title}, O_DIRECT")
        ax.grid(True, alpha=0.3)
        _legend_or_note(ax, f"no {title} jobs in this profile")
    axes[0].set_ylabel("bandwidth (MB/s)")
    fig.suptitle(f"{doc['host']}: {doc['device'].get('disk') or doc['device'].get('filesystem')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _latency_plot(doc: dict[str, Any], path: Path) -> Path:
    jobs = [j for j in _direct_jobs(doc, "harness") if j["rw"] == "randread"]
    sizes = sorted({j["bs_bytes"] for j in jobs}) or [0]
    cols = min(len(sizes), 3)
    rows = math.ceil(len(sizes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.5 * rows), squeeze=False)
    for ax, bs in zip(axes.flat, sizes, strict=False):
        chosen = sorted((j for j in jobs if j["bs_bytes"] == bs), key=lambda j: j["iodepth"])
        for p in PERCENTILES:
            key = percentile_key(p)
            points = [(j["iodepth"], j[key] * 1e3) for j in chosen if j.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), "-o", label=f"p{p:g}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"random read {_label(doc, bs)}")
        ax.set_xlabel("queue depth")
        ax.set_ylabel("completion latency (ms)")
        ax.grid(True, alpha=0.3)
        _legend_or_note(ax, "no latency percentiles in this profile")
    for ax in list(axes.flat)[len(sizes) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
