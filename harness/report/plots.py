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
from harness.report.rank import Estimate

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


Panel = tuple[str, str, str, str]  # machine, model, SSD, unit of the x axis


def _panels(ok: pd.DataFrame) -> list[Panel]:
    """One panel per machine x model x SSD (and x unit: a budget sweep and a cache-share sweep never share axes)."""
    keys = zip(ok["machine"], ok["model"], ok["device"], ok["x_unit"], strict=True)
    return sorted({(str(h), str(m), str(d), str(u)) for h, m, d, u in keys})


def _in_panel(frame: pd.DataFrame, panel: Panel) -> pd.DataFrame:
    machine, model, device, unit = panel
    same = (frame["machine"] == machine) & (frame["model"] == model) & (frame["device"] == device)
    return frame[same & (frame["x_unit"] == unit)]


def _panel_title(panel: Panel, frame: pd.DataFrame) -> str:
    machine, model, device, _ = panel
    return f"{model} on {device} ({machine})" if frame["machine"].nunique() > 1 else f"{model} on {device}"


def _spread_lines(ax: plt.Axes, frame: pd.DataFrame, column: str, scale: float = 1.0) -> None:
    """Mean per (policy, x) as a line, its 95% t-interval over repeats as error bars, every run as a dot."""
    for label, group in frame.groupby("label", sort=True):
        data = group.dropna(subset=["x", column])
        if data.empty:
            continue
        points = sorted((float(x), Estimate.of(g[column] * scale)) for x, g in data.groupby("x"))
        xs = [x for x, _ in points]
        line = ax.errorbar(
            xs,
            [e.mean for _, e in points],
            yerr=[e.half_width or 0.0 for _, e in points],
            marker="o",
            capsize=3,
            label=str(label),
        )
        ax.scatter(data["x"], data[column] * scale, s=10, alpha=0.35, color=line[0].get_color())


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
    frame: pd.DataFrame,
    out: Path,
    key: str,
    column: str,
    ylabel: str,
    title: str,
    scale: float = 1.0,
    caption: str = "Mean per policy; bars: 95% t-interval over repeats (none for a single run); dots: single runs.",
) -> Figure:
    """One panel per machine x model x SSD: `column` against the sweep's axis, one line per label (policy, or
    tier design and tier for a frame of tier rows)."""
    ok = frame[frame["eligible"] & frame[column].notna() & frame["x"].notna()]
    if ok.empty:
        return Figure(key, title, None, f"no ranked run has {column}")
    panels = _panels(ok)
    fig, axes = _grid(len(panels))
    for ax, panel in zip(axes, panels, strict=True):
        _spread_lines(ax, _in_panel(ok, panel), column, scale)
        ax.set_title(_panel_title(panel, ok))
        ax.set_xlabel(panel[3])
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return Figure(key, title, _save(fig, out, f"{key}.png"), caption)


def hit_rate_vs_budget(frame: pd.DataFrame, out: Path, bounds: dict[str, float], bound_note: str | None) -> Figure:
    """Decode hit rate against the sweep's axis per policy, with Belady's optimum replayed from the runs' traces."""
    title = "Decode hit rate vs RAM budget"
    ok = frame[frame["eligible"] & frame["hit_rate_decode"].notna() & frame["x"].notna()]
    if ok.empty:
        return Figure("hit_rate", title, None, "no ranked run has a decode hit rate")
    ok = ok.assign(belady=ok["uid"].map(bounds))
    panels = _panels(ok)
    fig, axes = _grid(len(panels))
    for ax, panel in zip(axes, panels, strict=True):
        data = _in_panel(ok, panel)
        _spread_lines(ax, data, "hit_rate_decode")
        bound = data.dropna(subset=["belady"]).groupby("x")["belady"].mean().sort_index()
        if not bound.empty:
            ax.plot(bound.index, bound.values, "k--", label="Belady (optimum)")
        ax.set_ylim(0, 1.02)
        ax.set_title(_panel_title(panel, ok))
        ax.set_xlabel(panel[3])
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
    """Time to first token and per-token decode latency, one pair of panels per machine x model x SSD.

    Inside a panel, boxes are grouped by the sweep's x value (one tick each) and coloured by policy
    (one legend), so a sweep of a dozen policies at three budgets has three tick labels, not 36.
    """
    title = "Time to first token and per-token latency"
    ok = frame[frame["eligible"] & frame["x"].notna()]
    if ok.empty:
        return Figure("latency", title, None, "no ranked run")
    panels = _panels(ok)
    labels = sorted(ok["label"].astype(str).unique())
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    cols = min(len(panels), 2)
    rows = (len(panels) + cols - 1) // cols
    width = max(7.0, 0.35 * len(labels) * ok["x"].nunique() + 2)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(width * cols, 7 * rows), squeeze=False)
    for i in range(len(panels), rows * cols):
        axes[2 * (i // cols), i % cols].set_visible(False)
        axes[2 * (i // cols) + 1, i % cols].set_visible(False)
    slot = 0.8 / len(labels)
    for i, panel in enumerate(panels):
        top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        data = _in_panel(ok, panel)
        xs = sorted(data["x"].unique())
        for j, label in enumerate(labels):
            mine = data[data["label"] == label]
            for k, x in enumerate(xs):
                group = mine[mine["x"] == x]
                if group.empty:
                    continue
                pos = k - 0.4 + slot * (j + 0.5)
                ttft = group["ttft_p50_s"].dropna().to_numpy()
                top.scatter([pos] * len(ttft), ttft, color=colours[label], s=18)
                samples = np.concatenate([_decode_intervals(runs[u]) for u in group["uid"]] or [np.array([])])
                if len(samples):
                    box = bottom.boxplot(
                        [samples * 1e3],
                        positions=[pos],
                        widths=slot * 0.8,
                        patch_artist=True,
                        showfliers=True,
                        medianprops={"color": "black"},
                    )
                    box["boxes"][0].set_facecolor(colours[label])
                else:
                    bottom.scatter([pos], group["token_latency_p50_s"].mean() * 1e3, marker="_", s=200, color="k")
        ticks = [f"{x:g}" for x in xs]
        for ax in (top, bottom):
            ax.set_xticks(range(len(xs)), ticks)
            ax.set_xlim(-0.5, len(xs) - 0.5)
            ax.grid(True, alpha=0.3)
        top.set_title(_panel_title(panel, ok))
        top.set_ylabel("time to first token,\np50 per run (s)")
        bottom.set_yscale("log")
        bottom.set_ylabel("decode token latency (ms)")
        bottom.set_xlabel(panel[3])
    handles = [plt.Line2D([], [], color=colours[label], marker="s", ls="", label=label) for label in labels]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, title="policy / strategy")
    caption = (
        "Top: one dot per run. Bottom: every decode token of every run of the configuration (from events); "
        "a black bar is a run's p50 where it recorded no token events."
    )
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
    title = f"Telemetry of {run.run_id} ({run.machine})"
    path = run.file("timeline", "timeline.parquet")
    if not path.is_file():
        return Figure(f"timeline-{run.uid}", title, None, "the run has no timeline.parquet")
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
    return Figure(f"timeline-{run.uid}", title, _save(fig, out, f"timeline-{run.uid}.png"), caption.strip())


def heatmap(run: Run, out: Path) -> Figure:
    """Accesses per (layer, expert) over the whole run, from its routing trace."""
    from harness.errors import HarnessError
    from harness.trace.schema import read_trace

    title = f"Expert accesses of {run.run_id} ({run.machine})"
    path = run.file("trace", "trace.parquet")
    if not path.is_file():
        return Figure(f"heatmap-{run.uid}", title, None, "the run has no trace.parquet")
    try:
        trace = read_trace(path)
    except HarnessError as exc:
        return Figure(f"heatmap-{run.uid}", title, None, str(exc))
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
    return Figure(f"heatmap-{run.uid}", title, _save(fig, out, f"heatmap-{run.uid}.png"))


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
