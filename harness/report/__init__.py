"""Reports: results folders -> DataFrame -> PNG plots (matplotlib) -> one `index.html` (Jinja2) + `summary.csv`.

The page opens from disk without a server: images sit beside it and are referenced by file name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, FileSystemLoader, select_autoescape

from harness.errors import HarnessError
from harness.predict import Check, reference_compute, validate_runs
from harness.report.load import (
    Run,
    belady_bounds,
    find_runs,
    format_x,
    mark_eligible,
    run_stack,
    runs_frame,
    tiers_frame,
)
from harness.report.plots import (
    MB,
    Figure,
    heatmap,
    hit_rate_vs_budget,
    latency,
    metric_vs_budget,
    ssd_profiles,
    timeline,
)
from harness.report.rank import CONFIDENCE, RankRow, TierConfigRow, rank, tier_configs
from harness.units import format_bytes

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).with_name("templates")
# Runs drawn in detail (timeline, heat map) when the user names none.
DEFAULT_DETAIL_RUNS = 4
_SUMMARY_COLUMNS = [
    "run_id",
    "machine",
    "machine_fingerprint",
    "status",
    "model",
    "device",
    "policy",
    "strategy",
    "scope",
    "ram_budget_bytes",
    "cache_slots",
    "repeat",
    "x",
    "x_unit",
    "decode_tokens_per_s",
    "decode_floor_ratio",
    "decode_steady_tokens",
    "prefill_tokens_per_s",
    "hit_rate_decode",
    "belady_hit_rate_decode",
    "ssd_read_bytes_per_token",
    "ttft_p50_s",
    "token_latency_p50_s",
    "token_latency_p99_s",
    "peak_rss_bytes",
    "budget_enforcement",
    "io_engine",
    "valid",
    "eligible",
    "validity_reasons",
    "error",
    "git_sha",
    "host",
    "folder",
]


def pick_detail_runs(frame: pd.DataFrame, wanted: list[str]) -> list[str]:
    """Uids of the runs named by the user (run_id prefixes allowed); else per policy the ranked run with the
    smallest budget."""
    if wanted:
        chosen = []
        for prefix in wanted:
            matches = [u for r, u in zip(frame["run_id"], frame["uid"], strict=True) if str(r).startswith(prefix)]
            if not matches:
                log.warning("--timeline %s matches no run", prefix)
            chosen.extend(m for m in matches if m not in chosen)
        return chosen
    ok = frame[frame["eligible"]].sort_values(["x", "repeat"], na_position="last")
    firsts = ok.groupby("label", sort=True).head(1)
    return list(firsts["uid"])[:DEFAULT_DETAIL_RUNS]


def spread_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per configuration: number of ranked runs and the mean, min, max and CV of decode tokens/s."""
    ok = frame[frame["eligible"]]
    if ok.empty:
        return pd.DataFrame()
    keys = ["machine", "model", "device", "label", "x_unit", "x"]
    grouped = ok.groupby(keys, dropna=False, sort=True)["decode_tokens_per_s"]
    table = grouped.agg(["count", "mean", "min", "max", "std"]).reset_index()
    table["cv_pct"] = 100 * table["std"].fillna(0) / table["mean"]
    return table


@dataclass
class PredictionRow:
    """A live run beside the what-if model's prediction for its own trace, capacity and SSD profile."""

    machine: str
    check: Check
    compute_source: str


def predictions(runs: list[Run]) -> tuple[list[PredictionRow], str]:
    """`harness predict --validate` over the report's runs, per machine and model; and a note on what was left out."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        # The serial model is for one cache: a tier stack's runs are left out (their tiers: the tier section).
        if run.result.get("status") == "ok" and run.result.get("hardware_profile") and not run_stack(run.result):
            model = (run.result.get("resolved") or {}).get("model_name") or ""
            groups.setdefault((run.machine, str(model)), []).append(run)
    if not groups:
        return [], "no run names an SSD profile (profile the SSD with `harness profile-ssd` before the sweep)"
    rows: list[PredictionRow] = []
    notes: list[str] = []
    for (machine, _), group in sorted(groups.items()):
        pairs = [(r.folder, r.result) for r in group]
        try:
            compute = reference_compute(pairs)
            checks, skipped = validate_runs(pairs, compute)
        except HarnessError as exc:
            notes.append(f"{machine}: {exc}")
            continue
        rows.extend(PredictionRow(machine, c, compute.source) for c in checks)
        notes.extend(f"{machine}: skipped {line}" for line in skipped[:3])
        if len(skipped) > 3:
            notes.append(f"{machine}: and {len(skipped) - 3} more skipped")
    return rows, "; ".join(notes)


def build_report(
    results: list[Path], out: Path, timeline_runs: list[str] | None = None, include_invalid: bool = False
) -> Path:
    """Write index.html, the PNGs and summary.csv for every run under `results`; return the index path.

    INVALID runs are listed apart and left out of the ranking and the plots unless `include_invalid`.
    """
    runs = find_runs(results)
    by_id: dict[str, Run] = {r.uid: r for r in runs}
    frame = mark_eligible(runs_frame(runs), include_invalid)
    out.mkdir(parents=True, exist_ok=True)
    bounds, bound_note = belady_bounds(runs)
    frame["belady_hit_rate_decode"] = frame["uid"].map(bounds)
    frame[[c for c in _SUMMARY_COLUMNS if c in frame]].to_csv(out / "summary.csv", index=False)

    figures: list[Figure] = [
        metric_vs_budget(
            frame, out, "throughput", "decode_tokens_per_s", "decode tokens/s", "Decode tokens/s vs RAM budget"
        ),
        hit_rate_vs_budget(frame, out, bounds, bound_note),
        metric_vs_budget(
            frame,
            out,
            "ssd_bytes",
            "ssd_read_bytes_per_token",
            "SSD MB read per token",
            "SSD bytes read per token",
            scale=1 / MB,
        ),
        latency(frame, by_id, out),
    ]
    detail = pick_detail_runs(frame, timeline_runs or [])
    detail_figures = [fig for uid in detail for fig in (timeline(by_id[uid], out), heatmap(by_id[uid], out))]
    profiles = sorted({Path(p) for p in frame["hardware_profile"].dropna() if Path(p).is_file()}, key=lambda p: str(p))
    profile_figures = ssd_profiles(profiles, out)

    prediction_rows, prediction_note = predictions(runs)
    tiers = tiers_frame(runs, frame)
    tier_figures = _tier_figures(tiers, out)

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
    env.filters["bytes"] = lambda v: "" if v is None or pd.isna(v) else format_bytes(float(v))
    env.filters["num"] = _num
    env.filters["x"] = _x
    html = env.get_template("index.html").render(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        sources=[str(p) for p in results],
        frame=frame,
        rows=frame.to_dict("records"),
        invalid=frame[frame["invalid"]].to_dict("records"),
        include_invalid=include_invalid,
        ranking=rank(frame),
        confidence=f"{CONFIDENCE:.0%}",
        machines=sorted(frame["machine"].unique()),
        has_floor=bool(frame["decode_floor_ratio"].notna().any()),
        counts=frame["status"].value_counts().to_dict(),
        figures=figures,
        detail_figures=detail_figures,
        profile_figures=profile_figures,
        spread=spread_table(frame).to_dict("records"),
        bound_note=bound_note,
        predictions=prediction_rows,
        prediction_note=prediction_note,
        tier_configs=tier_configs(frame, tiers),
        tier_figures=tier_figures,
    )
    index = out / "index.html"
    index.write_text(html)
    return index


def _tier_figures(tiers: pd.DataFrame, out: Path) -> list[Figure]:
    """Per-tier decode hit rate and bytes per token below each tier against the budget, and tiers.csv (every
    run's tier rows); nothing when no run has tiers."""
    if tiers.empty:
        return []
    tiers.to_csv(out / "tiers.csv", index=False)
    caption = (
        "One line per tier configuration and tier (capacities scale with the budget); mean over repeats, bars: "
        "95% t-interval. A tier's accesses are the misses of the tier above; page-cache values are the "
        "simulator's LRU model of it on the run's own trace (the live classification is in the table)."
    )
    return [
        metric_vs_budget(
            tiers,
            out,
            "tier_hit_rate",
            "hit_rate_decode",
            "decode hit rate of the tier",
            "Decode hit rate per tier",
            caption=caption,
        ),
        metric_vs_budget(
            tiers,
            out,
            "tier_edge_bytes",
            "edge_bytes_per_token_decode",
            "MB per decode token",
            "Bytes per decode token crossing the edge below each tier",
            scale=1 / MB,
            caption=caption,
        ),
    ]


def _x(row: dict[str, Any] | RankRow | TierConfigRow) -> str:
    """A table row's position on the sweep's axis, in words."""
    x, unit = (row["x"], row["x_unit"]) if isinstance(row, dict) else (row.x, row.x_unit)
    return "" if x is None or pd.isna(x) else format_x(float(x), str(unit))


def _num(value: object, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


__all__ = ["build_report"]
