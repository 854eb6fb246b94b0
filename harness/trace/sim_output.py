"""Tables, files and the plot of a simulation run: rows per policy x capacity x layer, CSV, Parquet, PNG, JSON."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import pandas as pd

from harness.keys import PHASES, Phase
from harness.results import write_json_atomic
from harness.trace.simulate import ORACLES, SimulationRun

log = logging.getLogger(__name__)


def result_rows(run: SimulationRun) -> list[dict[str, object]]:
    """One row per policy, capacity, counted phase ('all' and each phase that has accesses) and layer
    ('all' and each MoE layer)."""
    rows: list[dict[str, object]] = []
    whole = run.meta.num_experts * (len(run.meta.moe_layers) if run.scope == "global" else 1)
    for result in run.results:
        phases = ["all"] + [p for p in PHASES if result.total(p).accesses]
        for phase in phases:
            counted = None if phase == "all" else cast(Phase, phase)
            for layer in ["all", *run.meta.moe_layers]:
                total = result.total(counted, None if layer == "all" else layer)  # type: ignore[arg-type]
                per_token = layer == "all"
                rows.append(
                    {
                        "policy": result.policy,
                        "capacity_slots": result.capacity_slots,
                        "capacity_pct": 100.0 * result.capacity_slots / whole,
                        "scope": run.scope,
                        "phase_filter": run.phase,
                        "reset": run.reset,
                        "counted_phase": phase,
                        "layer": str(layer),
                        "hits": total.hits,
                        "misses": total.misses,
                        "accesses": total.accesses,
                        "hit_rate": total.hit_rate,
                        "misses_per_token": result.misses_per_token(counted) if per_token else None,
                        "bytes_read_per_token": result.bytes_read_per_token(counted) if per_token else None,
                        "heldout_only": run.heldout_only,
                        "split": run.split,
                        "bound": result.policy in ORACLES,
                        "replay_s": result.elapsed_s,
                    }
                )
    return rows


def write_outputs(run: SimulationRun, out: Path) -> list[Path]:
    """simulation.csv, simulation.parquet, hit_rate_vs_capacity.png and simulation.json under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(result_rows(run))
    written = []
    csv_path = out / "simulation.csv"
    frame.to_csv(csv_path, index=False)
    written.append(csv_path)
    parquet_path = out / "simulation.parquet"
    frame.to_parquet(parquet_path, index=False)
    written.append(parquet_path)
    written.append(plot_hit_rates(run, frame, out / "hit_rate_vs_capacity.png"))
    written.append(write_json_atomic(out / "simulation.json", summary(run)))
    return written


def summary(run: SimulationRun) -> dict[str, object]:
    """What was replayed, how, and each policy's description (simulation.json; `simulate --json` adds the rows)."""
    return run.header() | {
        "heldout_only": run.heldout_only,
        "split": run.split,
        "bounds": [p for p in ORACLES if any(r.policy == p for r in run.results)],
        "notes": run.notes,
        "policies": {r.policy: r.description for r in run.results},
    }


def plot_hit_rates(run: SimulationRun, frame: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overall = frame[(frame["layer"] == "all") & (frame["counted_phase"] == "all")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, group in overall.groupby("policy", sort=False):
        group = group.sort_values("capacity_pct")
        oracle = policy in ORACLES
        ax.plot(
            group["capacity_pct"],
            group["hit_rate"],
            linestyle=":" if policy == "static-oracle" else "--" if oracle else "-",
            color="black" if policy == "belady" else "grey" if oracle else None,
            marker="o",
            label=f"{policy} (bound)" if oracle else policy,
        )
    ax.set_xlabel("capacity (% of the experts a cache group holds)")
    ax.set_ylabel("hit rate")
    title = f"{run.meta.model}: {run.scope}, phase {run.phase}, reset {run.reset}"
    if run.split is not None:
        title += f", held-out part of split {run.split}"
    elif run.heldout_only:
        title += ", held-out sequences"
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
