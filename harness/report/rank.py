"""The ranking on top of the report: per (machine, model, SSD, budget), which policy or strategy decodes fastest.

Each entry's decode tokens/s is the mean of its repeats with a two-sided 95% Student-t interval
(runs with the same spec except `repeat`). Two entries whose intervals overlap are a tie: the
table names the ties instead of crowning a winner the noise does not separate. An entry run once
has no interval, and the table says that nothing can be told apart from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

# Two-sided 95% critical values of Student's t by degrees of freedom (1..30), from the standard table
# (NIST/SEMATECH e-Handbook of Statistical Methods, section 1.3.6.7.2, "Critical values of the Student's t
# distribution", column 0.975). Beyond 30 degrees of freedom the normal value 1.960 is within 4%.
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
Z_975 = 1.960
CONFIDENCE = 0.95
BASELINE = "lru"
GROUP = ["machine", "model", "device", "x_unit", "x"]


@dataclass
class Estimate:
    """Mean of n runs and the half-width of its 95% t-interval (None for a single run)."""

    mean: float
    half_width: float | None
    n: int

    @classmethod
    def of(cls, values: np.ndarray | pd.Series) -> Estimate:
        arr = np.asarray(values, dtype=np.float64)
        arr = arr[~np.isnan(arr)]
        if len(arr) < 2:
            return cls(float(arr.mean()) if len(arr) else math.nan, None, len(arr))
        df = len(arr) - 1
        t = T_975[df - 1] if df <= len(T_975) else Z_975
        return cls(float(arr.mean()), float(t * arr.std(ddof=1) / math.sqrt(len(arr))), len(arr))

    def overlaps(self, other: Estimate) -> bool | None:
        """Whether the two intervals overlap; None when either is a single run (nothing can be told)."""
        if self.half_width is None or other.half_width is None:
            return None
        return abs(self.mean - other.mean) <= self.half_width + other.half_width

    def text(self, digits: int = 3) -> str:
        """'5.2 ± 0.31 (n=3)', or '5.2 (n=1)' for a single run."""
        shown = f"{self.mean:.{digits}g}"
        spread = f" ± {self.half_width:.2g}" if self.half_width is not None else ""
        return f"{shown}{spread} (n={self.n})"


@dataclass
class Entry:
    label: str
    tokens_per_s: Estimate
    hit_rate: float | None
    belady_hit_rate: float | None
    floor_ratio: float | None


@dataclass
class RankRow:
    """One (machine, model, SSD, budget) group: its best entry, the entries tied with it, and the gaps."""

    machine: str
    model: str
    device: str
    x: float
    x_unit: str
    best: Entry
    ties: list[str]
    untold: list[str]
    margin_over_lru_pct: float | None
    lru_within_noise: bool | None
    belady_gap_pp: float | None
    others: list[Entry] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.ties:
            return f"tie with {', '.join(self.ties)}: 95% intervals overlap"
        if self.untold:
            return f"not told apart from {', '.join(self.untold)}: single runs have no interval"
        return "ahead beyond the 95% intervals" if self.others else "only entry"


def _mean(series: pd.Series) -> float | None:
    values = series.dropna()
    return float(values.mean()) if len(values) else None


def rank(frame: pd.DataFrame) -> list[RankRow]:
    """One RankRow per group of eligible runs (see load.mark_eligible), sorted by machine, model, SSD, budget."""
    runs = frame[frame["eligible"] & frame["x"].notna()]
    rows: list[RankRow] = []
    for (machine, model, device, x_unit, x), group in runs.groupby(GROUP, sort=True):
        entries = [
            Entry(
                str(label),
                Estimate.of(g["decode_tokens_per_s"]),
                _mean(g["hit_rate_decode"]),
                _mean(g["belady_hit_rate_decode"]) if "belady_hit_rate_decode" in g else None,
                _mean(g["decode_floor_ratio"]) if "decode_floor_ratio" in g else None,
            )
            for label, g in group.groupby("label", sort=True)
        ]
        entries.sort(key=lambda e: e.tokens_per_s.mean, reverse=True)
        best, others = entries[0], entries[1:]
        overlap = {e.label: best.tokens_per_s.overlaps(e.tokens_per_s) for e in others}
        lru = next((e for e in entries if e.label == BASELINE), None)
        margin = None if lru is None else 100 * (best.tokens_per_s.mean / lru.tokens_per_s.mean - 1)
        gap = None
        if best.hit_rate is not None and best.belady_hit_rate is not None:
            gap = 100 * (best.belady_hit_rate - best.hit_rate)
        rows.append(
            RankRow(
                machine=str(machine),
                model=str(model),
                device=str(device),
                x=float(x),
                x_unit=str(x_unit),
                best=best,
                ties=[label for label, o in overlap.items() if o],
                untold=[label for label, o in overlap.items() if o is None],
                margin_over_lru_pct=margin,
                lru_within_noise=None if lru is None or lru is best else overlap[BASELINE],
                belady_gap_pp=gap,
                others=others,
            )
        )
    return rows


@dataclass
class TierCell:
    """One tier of one tier configuration: means over the configuration's ranked runs (None where none has it)."""

    tier: int
    kind: str
    policy: str
    capacity_slots: int | None
    modelled: bool
    edge_below: str
    hit_rate_decode: float | None
    served_share: float | None
    edge_bytes_per_token_decode: float | None
    hit_rate: float | None
    """All phases; for the page cache, the simulator's LRU model of it on the run's own trace."""
    live_hit_rate: float | None
    """The page cache's hit rate as the run's reads were classified (page cache or device); None for slot tiers."""
    model_minus_live_hit_rate: float | None


@dataclass
class TierConfigRow:
    """One tier configuration (design) of one (machine, model, SSD, budget) group: tokens/s over its repeats,
    SSD bytes per token and its tiers."""

    machine: str
    model: str
    device: str
    x: float
    x_unit: str
    design: str
    stacks: list[str]
    tokens_per_s: Estimate
    ssd_read_bytes_per_token: float | None
    tiers: list[TierCell]

    @property
    def pagecache(self) -> list[TierCell]:
        """Its page-cache tiers (live classification beside the model)."""
        return [t for t in self.tiers if t.modelled]


def tier_configs(frame: pd.DataFrame, tiers: pd.DataFrame) -> list[TierConfigRow]:
    """Per (machine, model, SSD, budget), each tier configuration of its ranked runs, fastest first.

    `frame` is the runs frame (load.runs_frame after mark_eligible), `tiers` its tier rows (load.tiers_frame).
    """
    if tiers.empty:
        return []
    runs = frame[frame["eligible"] & frame["x"].notna() & frame["tiers"].notna()]
    ranked = tiers[tiers["eligible"].fillna(False).astype(bool)]
    rows: list[TierConfigRow] = []
    for (machine, model, device, x_unit, x), group in runs.groupby(GROUP, sort=True):
        configs = [
            TierConfigRow(
                machine=str(machine),
                model=str(model),
                device=str(device),
                x=float(x),
                x_unit=str(x_unit),
                design=str(label),
                stacks=sorted(set(g["tiers"])),
                tokens_per_s=Estimate.of(g["decode_tokens_per_s"]),
                ssd_read_bytes_per_token=_mean(g["ssd_read_bytes_per_token"]),
                tiers=_tier_cells(ranked[ranked["uid"].isin(g["uid"])]),
            )
            for label, g in group.groupby("label", sort=True)
        ]
        rows.extend(sorted(configs, key=lambda c: c.tokens_per_s.mean, reverse=True))
    return rows


def _tier_cells(rows: pd.DataFrame) -> list[TierCell]:
    def mean(group: pd.DataFrame, column: str) -> float | None:
        return _mean(group[column]) if column in group else None

    cells = []
    for tier, g in rows.groupby("tier", sort=True):
        first = g.iloc[0]
        capacities = set(g["capacity_slots"].dropna())
        cells.append(
            TierCell(
                tier=int(tier),
                kind=str(first["kind"]),
                policy=str(first["policy"]),
                capacity_slots=int(capacities.pop()) if len(capacities) == 1 else None,
                modelled=bool(first["modelled"]),
                edge_below=str(first["edge_below"]),
                hit_rate_decode=mean(g, "hit_rate_decode"),
                served_share=mean(g, "served_share"),
                edge_bytes_per_token_decode=mean(g, "edge_bytes_per_token_decode"),
                hit_rate=mean(g, "hit_rate"),
                live_hit_rate=mean(g, "live_hit_rate"),
                model_minus_live_hit_rate=mean(g, "model_minus_live_hit_rate"),
            )
        )
    return cells
