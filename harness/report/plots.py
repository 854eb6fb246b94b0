"""The report's PNGs (matplotlib, Agg backend): one function per figure, each returning a `Figure` record.

A figure that cannot be drawn (no runs with the data it needs) returns a `Figure` with `file=None`
and the reason, so the page says what is missing instead of showing a broken image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: reports are rendered on servers without a display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from cycler import cycler

from harness.report.load import Run
from harness.units import format_bytes

log = logging.getLogger(__name__)

# Ten colours, then the same ten dashed: a sweep of a dozen policies and strategies stays tellable apart.
plt.rcParams["axes.prop_cycle"] = cycler(linestyle=["-", "--"]) * cycler(color=plt.get_cmap("tab10").colors)

GIB = 2**30
MB = 1e6
DPI = 100


@dataclass
class Figure:
    """One image of the report: its file name in the report folder (None: not drawn), title, caption."""

    key: str
    title: str
    file: str | None
    caption: str = ""


def _panels(ok: pd.DataFrame) -> list[tuple[str, str]]:
    return sorted({(str(m), str(d)) for m, d in zip(ok["model"], ok["device"], strict=True)})


def _budget_axis_label(frame: pd.DataFrame) -> str:
    if frame["ram_budget_bytes"].notna().all():
        return "RAM budget (GiB)"
    return "RAM budget, or expert-cache size where none (GiB)"


def _spread_lines(ax: plt.Axes, frame: pd.DataFrame, column: str, scale: float = 1.0) -> None:
    """Mean per (policy, budget) as a line, min..max over repeats as error bars, every run as a dot."""
    for label, group in frame.groupby("label", sort=True):
        data = group.dropna(subset=["budget_bytes", column])
        if data.empty:
            continue
        x = data["budget_bytes"] / GIB
        y = data[column] * scale
        stats = pd.DataFrame({"x": x, "y": y}).groupby("x")["y"].agg(["mean", "min", "max"]).sort_index()
        line = ax.errorbar(
            stats.index,
            stats["mean"],
            yerr=[stats["mean"] - stats["min"], stats["max"] - stats["mean"]],
            marker="o",
            capsize=3,
            label=str(label),
        )
        ax.scatter(x, y, s=10, alpha=0.35, color=line[0].get_color())


def _grid(n: int, width: float = 8.5, height: float = 4.5) -> tuple[plt.Figure, list[plt.Axes]]:
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _save(fig: plt.Figure, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=DPI, bbox_inches="tight")  # legends sit outside the axes
    plt.close(fig)
    return name


def metric_vs_budget(
    frame: pd.DataFrame, out: Path, key: str, column: str, ylabel: str, title: str, scale: float = 1.0
) -> Figure:
    """One panel per model x device: `column` against the budget, one line per policy."""
    ok = frame[(frame["status"] == "ok") & frame[column].notna() & frame["budget_bytes"].notna()]
    if ok.empty:
        return Figure(key, title, None, f"no successful run has {column}")
    panels = _panels(ok)
    fig, axes = _grid(len(panels))
    for ax, (model, device) in zip(axes, panels, strict=True):
        _spread_lines(ax, ok[(ok["model"] == model) & (ok["device"] == device)], column, scale)
        ax.set_title(f"{model} on {device}")
        ax.set_xlabel(_budget_axis_label(ok))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    caption = "Mean per policy and budget; bars span min..max over repeats; dots are single runs."
    return Figure(key, title, _save(fig, out, f"{key}.png"), caption)


def hit_rate_vs_budget(frame: pd.DataFrame, out: Path, bounds: dict[str, float], bound_note: str | None) -> Figure:
    """Decode hit rate against the budget per policy, with Belady's optimum replayed from the runs' traces."""
    title = "Decode hit rate vs RAM budget"
    ok = frame[(frame["status"] == "ok") & frame["hit_rate_decode"].notna() & frame["budget_bytes"].notna()]
    if ok.empty:
        return Figure("hit_rate", title, None, "no successful run has a decode hit rate")
    ok = ok.assign(belady=ok["run_id"].map(bounds))
    panels = _panels(ok)
    fig, axes = _grid(len(panels))
    for ax, (model, device) in zip(axes, panels, strict=True):
        panel = ok[(ok["model"] == model) & (ok["device"] == device)]
        _spread_lines(ax, panel, "hit_rate_decode")
        bound = panel.dropna(subset=["belady"]).groupby("budget_bytes")["belady"].mean().sort_index()
        if not bound.empty:
            ax.plot(bound.index / GIB, bound.values, "k--", label="Belady (optimum)")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{model} on {device}")
        ax.set_xlabel(_budget_axis_label(ok))
        ax.set_ylabel("decode hit rate")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    caption = (
        "Belady: each run's trace replayed through the optimal policy at the run's capacity. Strategies that "
        "load experts ahead of use by prediction (prefetch, on-demand) count an expert found resident as a hit, "
        "so they can pass the caching bound; their SSD bytes per token show the price."
    )
    if bound_note:
        caption += f" {bound_note}."
    return Figure("hit_rate", title, _save(fig, out, "hit_rate.png"), caption)


def _decode_intervals(run: Run) -> np.ndarray:
    """Seconds between consecutive decode tokens of each sequence, from the run's events."""
    path = run.file("events", "events.parquet")
    if not path.is_file():
        return np.array([])
    events = pd.read_parquet(path)
    if "phase" not in events or "name" not in events:
        return np.array([])
    seq_col = "seq" if "seq" in events else "seq_id" if "seq_id" in events else None
    tokens = events[events["name"].astype(str) == "token"]
    gaps = []
    for _, group in tokens.groupby(seq_col) if seq_col else [(0, tokens)]:
        t = group["t_s"].to_numpy()
        is_decode = (group["phase"].astype(str) == "decode").to_numpy()
        # A decode token's latency runs from the token before it (prefill's or the previous decode's).
        gaps.append(np.diff(t)[is_decode[1:]])
    return np.concatenate(gaps) if gaps else np.array([])


def latency(frame: pd.DataFrame, runs: dict[str, Run], out: Path) -> Figure:
    """Time to first token per configuration, and the distribution of per-token decode latency."""
    title = "Time to first token and per-token latency"
    ok = frame[frame["status"] == "ok"]
    if ok.empty:
        return Figure("latency", title, None, "no successful run")
    configs = ok.groupby(["model", "device", "label", "budget_bytes"], dropna=False, sort=True)
    names, ttft, dists = [], [], []
    for (model, device, label, budget), group in configs:
        shown = "no budget" if pd.isna(budget) else format_bytes(budget)
        names.append(f"{model}/{device}\n{label} @ {shown}")
        ttft.append(group["ttft_p50_s"].dropna().to_numpy())
        samples = [_decode_intervals(runs[r]) for r in group["run_id"]]
        dists.append(np.concatenate(samples) if samples else np.array([]))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7, 1.1 * len(names) + 2), 8), sharex=True)
    positions = np.arange(len(names))
    for i, values in enumerate(ttft):
        if len(values):
            top.scatter([i] * len(values), values, color="C0", s=18)
    top.set_ylabel("time to first token,\np50 per run (s)")
    top.grid(True, alpha=0.3)
    drawn = [(i, d) for i, d in enumerate(dists) if len(d)]
    if drawn:
        bottom.boxplot([d * 1e3 for _, d in drawn], positions=[i for i, _ in drawn], showfliers=True)
        bottom.set_yscale("log")
    else:
        p50 = ok.groupby(["model", "device", "label", "budget_bytes"], dropna=False, sort=True)[
            "token_latency_p50_s"
        ].mean()
        bottom.scatter(positions, p50.to_numpy() * 1e3, marker="_", s=200, label="p50 (no token events)")
        bottom.legend(fontsize=8)
    bottom.set_xticks(positions, names, fontsize=7, rotation=30, ha="right")
    bottom.set_ylabel("decode token latency (ms)")
    bottom.grid(True, alpha=0.3)
    caption = "Top: one dot per run. Bottom: every decode token of every run of the configuration (from events)."
    return Figure("latency", title, _save(fig, out, "latency.png"), caption)


def _phase_spans(events: pd.DataFrame) -> list[tuple[float, float, str]]:
    """(start, end, phase) spans: prefill from `prefill_start` to the sequence's first token, decode after."""
    if events is None or events.empty:
        return []
    names = events["name"].astype(str).to_numpy()
    t = events["t_s"].to_numpy()
    phases = events["phase"].astype(str).to_numpy() if "phase" in events else np.array([""] * len(events))
    spans = []
    start = None
    prefill_end = None
    for i, name in enumerate(names):
        if name == "prefill_start":
            if prefill_end is not None and start is not None:
                spans.append((prefill_end, t[i], "decode"))
            start, prefill_end = t[i], None
        elif name == "token" and start is not None and prefill_end is None and phases[i] == "prefill":
            prefill_end = t[i]
            spans.append((start, prefill_end, "prefill"))
        elif name in ("sequence_end", "decode_end") and prefill_end is not None:
            spans.append((prefill_end, t[i], "decode"))
            start = prefill_end = None
    return spans


def timeline(run: Run, out: Path) -> Figure:
    """Disk MB/s, memory, CPU and GPU over the run's wall time, prefill and decode shaded."""
    title = f"Telemetry of {run.run_id}"
    path = run.file("timeline", "timeline.parquet")
    if not path.is_file():
        return Figure(f"timeline-{run.run_id}", title, None, "the run has no timeline.parquet")
    tl = pd.read_parquet(path)
    events_path = run.file("events", "events.parquet")
    events = pd.read_parquet(events_path) if events_path.is_file() else None
    gpu_cols = [c for c in ("gpu_util_pct", "gpu_mem_used_bytes", "gpu_power_w") if c in tl]
    rows = 4 if gpu_cols else 3
    fig, axes = plt.subplots(rows, 1, figsize=(11, 2.3 * rows), sharex=True)
    t = tl["t_s"].to_numpy()
    dt = np.diff(t)
    ax = axes[0]
    if "disk_read_bytes" in tl and len(t) > 1:
        for col, name in (("disk_read_bytes", "read"), ("disk_write_bytes", "write")):
            rate = np.diff(tl[col].to_numpy()) / np.where(dt > 0, dt, np.nan) / MB
            ax.step(t[1:], rate, where="pre", label=name)
        ax.set_ylabel("disk MB/s")
        ax.legend(fontsize=8, loc="upper right")
    else:
        ax.text(0.5, 0.5, "no disk counters in this run", ha="center", va="center", transform=ax.transAxes)
    ax = axes[1]
    for col, name in (("rss_bytes", "RSS"), ("cgroup_usage_bytes", "cgroup usage"), ("page_cache_bytes", "page cache")):
        if col in tl:
            ax.plot(t, tl[col] / GIB, label=name)
    ax.set_ylabel("GiB")
    ax.legend(fontsize=8, loc="upper right")
    ax = axes[2]
    for col, name in (("cpu_pct", "system CPU % (all cores)"), ("process_cpu_pct", "run CPU % (one core = 100)")):
        if col in tl:
            ax.plot(t, tl[col], label=name)
    ax.set_ylabel("CPU %")
    ax.legend(fontsize=8, loc="upper right")
    if gpu_cols:
        ax = axes[3]
        if "gpu_util_pct" in tl:
            ax.plot(t, tl["gpu_util_pct"], label="GPU util %")
        if "gpu_mem_used_bytes" in tl:
            ax.plot(t, tl["gpu_mem_used_bytes"] / GIB * 10, label="GPU memory (GiB x10)")
        ax.set_ylabel("GPU")
        ax.legend(fontsize=8, loc="upper right")
    spans = _phase_spans(events)
    for a in axes:
        a.grid(True, alpha=0.3)
        for begin, end, phase in spans:
            a.axvspan(begin, end, color="C1" if phase == "prefill" else "C2", alpha=0.12, lw=0)
    axes[-1].set_xlabel("seconds since telemetry start")
    spec = run.result.get("spec") or {}
    budget = spec.get("ram_budget") or "no budget"
    fig.suptitle(
        f"{run.run_id}: {spec.get('strategy', 'cache')}/{spec.get('policy')} @ {budget} (prefill orange, decode green)"
    )
    caption = "" if spans else "No prefill/decode events in this run."
    if not gpu_cols:
        reason = ((run.result.get("telemetry") or {}).get("gpu") or {}).get("reason")
        caption += f" No GPU columns: {reason or 'no GPU telemetry'}."
    return Figure(f"timeline-{run.run_id}", title, _save(fig, out, f"timeline-{run.run_id}.png"), caption.strip())


def heatmap(run: Run, out: Path) -> Figure:
    """Accesses per (layer, expert) over the whole run, from its routing trace."""
    from harness.errors import HarnessError
    from harness.trace.schema import read_trace

    title = f"Expert accesses of {run.run_id}"
    path = run.file("trace", "trace.parquet")
    if not path.is_file():
        return Figure(f"heatmap-{run.run_id}", title, None, "the run has no trace.parquet")
    try:
        trace = read_trace(path)
    except HarnessError as exc:
        return Figure(f"heatmap-{run.run_id}", title, None, str(exc))
    counts = np.zeros((len(trace.meta.moe_layers), trace.meta.num_experts), dtype=np.int64)
    for seq in trace.sequences:
        for li in range(counts.shape[0]):
            np.add.at(counts[li], seq.experts[:, li, :].ravel().astype(np.int64), 1)
    fig, ax = plt.subplots(figsize=(min(16, 3 + 0.18 * counts.shape[1]), min(10, 1.5 + 0.3 * counts.shape[0])))
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(trace.meta.moe_layers)), [str(x) for x in trace.meta.moe_layers], fontsize=7)
    fig.colorbar(image, ax=ax, label="accesses (token x top-k selections)")
    ax.set_title(f"{trace.meta.model}: {trace.num_rows} rows, top-{trace.meta.top_k} of {trace.meta.num_experts}")
    return Figure(f"heatmap-{run.run_id}", title, _save(fig, out, f"heatmap-{run.run_id}.png"))


def ssd_profiles(profile_paths: list[Path], out: Path) -> list[Figure]:
    """The SSD profile curves (bandwidth and latency vs queue depth) drawn by harness.ssd.plots."""
    figures = []
    for i, path in enumerate(profile_paths):
        title = f"SSD profile {path.name}"
        try:
            from harness.results import read_json
            from harness.ssd.plots import write_plots

            files = write_plots(read_json(path), out / f"ssd-{i}-{path.stem}.json")
        except Exception as exc:  # the profile format belongs to harness.ssd; show why, never fail the report
            figures.append(Figure(f"ssd-{i}", title, None, f"cannot draw {path}: {exc.__class__.__name__}: {exc}"))
            continue
        for file in files:
            figures.append(Figure(file.stem, title, file.name, str(path)))
    return figures
