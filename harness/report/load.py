"""Results folders -> one pandas DataFrame, one row per run, with the columns the plots and tables use.

Reads every `<run_id>/result.json` under the given folders (any depth), tolerating failed runs
(no metrics) and older fields. The Belady bound is computed here, per run, by replaying the run's
trace through `harness.trace.simulate` at the run's cache capacity.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from harness.errors import HarnessError
from harness.result_model import parse_result
from harness.results import read_json

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
GIB = 2**30
BUDGET_UNIT = "RAM budget (GiB)"
SHARE_UNIT = "experts cached (%)"


def format_x(x: float, unit: str) -> str:
    """A position on the sweep's axis as a reader says it: '1.5 GiB RAM' or '25% of experts cached'."""
    return f"{x:g} GiB RAM" if unit == BUDGET_UNIT else f"{x:.3g}% of experts cached"


@dataclass
class Run:
    """One result folder and its parsed result.json."""

    folder: Path
    result: dict[str, Any]

    @property
    def run_id(self) -> str:
        return str(self.result.get("run_id") or self.folder.name)

    @property
    def machine(self) -> str:
        """The machine the run measured: result.machine.host (harness.identity), else the environment's host."""
        named = _get(self.result, "machine", "host") or _get(self.result, "environment", "host")
        return str(named or "unknown machine")

    @property
    def machine_fingerprint(self) -> str:
        """The hardware fingerprint the result names, else the host name: two machines never share one."""
        return str(_get(self.result, "machine", "fingerprint") or self.machine)

    @property
    def uid(self) -> str:
        """The run_id made unique across machines (the same spec run on two machines has one run_id)."""
        return f"{self.run_id}-{hashlib.sha256(self.machine_fingerprint.encode()).hexdigest()[:6]}"

    def file(self, key: str, default: str) -> Path:
        name = (self.result.get("files") or {}).get(key) or default
        return self.folder / name


def find_runs(folders: list[Path]) -> list[Run]:
    """Every run under `folders`, each (run_id, machine) once (the first folder given wins)."""
    runs: dict[str, Run] = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob(RESULT_FILE)):
            try:
                data = read_json(path)
            except (OSError, ValueError) as exc:
                log.warning("skipping %s: %s", path, exc)
                continue
            if not isinstance(data, dict) or "run_id" not in data:
                log.warning("skipping %s: not a harness result", path)
                continue
            # A result of an unknown schema version is refused (HarnessError), not guessed at.
            run = Run(path.parent, parse_result(data, path).to_dict())
            runs.setdefault(run.uid, run)
    if not runs:
        raise HarnessError(f"no result.json under {', '.join(str(f) for f in folders)}")
    return list(runs.values())


def _get(d: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _pct(value: Any, key: str) -> float | None:
    """A percentile from a {p50, p90, p99, mean} mapping, or a plain number as it is."""
    if isinstance(value, dict):
        return value.get(key)
    return value if isinstance(value, int | float) else None


def _row(run: Run) -> dict[str, Any]:
    r = run.result
    spec = r.get("spec") or {}
    resolved = r.get("resolved") or {}
    metrics = r.get("metrics") or {}
    storage = r.get("storage") or {}
    env = r.get("environment") or {}
    budget = resolved.get("ram_budget_bytes")
    if budget is None and spec.get("ram_budget") is not None:
        from harness.units import parse_size

        budget = parse_size(spec["ram_budget"])
    policy = resolved.get("policy") or spec.get("policy")
    strategy = resolved.get("strategy") or spec.get("strategy") or "cache"
    stack = run_stack(r)
    # A tier stack's runs are told apart by their design (the policy field is not theirs), one line across budgets.
    entry = policy if stack is None else tier_design(stack)
    return {
        "uid": run.uid,
        "run_id": run.run_id,
        "machine": run.machine,
        "machine_fingerprint": run.machine_fingerprint,
        "status": r.get("status"),
        "error": r.get("error"),
        "model": resolved.get("model_name") or Path(str(spec.get("model", "?"))).name,
        "device": storage.get("disk") or storage.get("device") or "unknown device",
        "policy": policy,
        "strategy": strategy,
        "label": entry if strategy == "cache" else f"{strategy}/{entry}",
        "tiers": stack,
        "scope": resolved.get("scope") or spec.get("scope"),
        "ram_budget_bytes": budget,
        "cache_slots": resolved.get("cache_slots"),
        "cache_bytes": resolved.get("cache_bytes"),
        "cache_fraction": _cache_fraction(resolved),
        "workload": spec.get("workload"),
        "max_new_tokens": spec.get("max_new_tokens"),
        "seed": spec.get("seed"),
        "repeat": spec.get("repeat", 0),
        "decode_tokens_per_s": metrics.get("decode_tokens_per_s"),
        "decode_floor_ratio": metrics.get("decode_floor_ratio"),
        "decode_steady_tokens": metrics.get("decode_steady_tokens"),
        "prefill_tokens_per_s": metrics.get("prefill_tokens_per_s"),
        "hit_rate_decode": metrics.get("hit_rate_decode"),
        "hit_rate_prefill": metrics.get("hit_rate_prefill"),
        "ssd_read_bytes": metrics.get("ssd_read_bytes"),
        "ssd_read_bytes_per_token": metrics.get("ssd_read_bytes_per_token"),
        "device_read_bytes": metrics.get("device_read_bytes"),
        "ttft_p50_s": _pct(metrics.get("ttft_s"), "p50"),
        "ttft_p90_s": _pct(metrics.get("ttft_s"), "p90"),
        "token_latency_p50_s": _pct(metrics.get("token_latency_s"), "p50"),
        "token_latency_p90_s": _pct(metrics.get("token_latency_s"), "p90"),
        "token_latency_p99_s": _pct(metrics.get("token_latency_s"), "p99"),
        "peak_rss_bytes": metrics.get("peak_rss_bytes"),
        "budget_enforcement": resolved.get("budget_enforcement"),
        "io_engine": resolved.get("io_engine"),
        "valid": _get(r, "validity", "valid"),
        "validity_reasons": "; ".join(_get(r, "validity", "reasons") or []),
        "git_sha": (_get(env, "git", "sha") or "")[:10],
        "git_dirty": _get(env, "git", "dirty"),
        "host": env.get("host"),
        "kernel": env.get("kernel"),
        "cpu": _get(env, "cpu", "model"),
        "gpu": _gpu_name(env),
        "hardware_profile": r.get("hardware_profile"),
        "folder": str(run.folder),
    }


def run_stack(result: dict[str, Any]) -> str | None:
    """The run's tier stack as written ('host:lru:16,pagecache:512'): the spec's, else its tier rows'; None for a
    single-cache run."""
    stack = (result.get("spec") or {}).get("tiers")
    if stack:
        return str(stack)
    rows = _get(result, "metrics", "tiers") or []
    return str(rows[0]["stack"]) if rows and rows[0].get("stack") else None


def tier_design(stack: str) -> str:
    """A stack without its capacities, the same at every budget: 'host:lru:16,pagecache:512' -> 'host:lru over
    pagecache' (the page cache's policy is the kernel's)."""
    from harness.cache.tiers import parse_tiers

    try:
        tiers = parse_tiers(stack)
    except HarnessError:
        return stack
    return " over ".join(t.kind if t.modelled else f"{t.kind}:{t.policy}" for t in tiers)


TIER_RUN_COLUMNS = ["uid", "run_id", "machine", "model", "device", "label", "x_unit", "x", "repeat", "eligible"]
"""The run columns every tier row carries (it is plotted and grouped as its run is)."""


def tiers_frame(runs: list[Run], frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, tier) of the runs whose metrics carry `tiers` (top tier first): the run's columns of
    `frame` (after mark_eligible) and the tier's own keys as the run wrote them; empty without tier runs."""
    rows = [
        {"uid": run.uid, **tier}
        for run in runs
        for tier in (_get(run.result, "metrics", "tiers") or [])
        if isinstance(tier, dict)
    ]
    if not rows:
        return pd.DataFrame()
    tiers = pd.DataFrame(rows)
    merged = tiers.merge(frame[TIER_RUN_COLUMNS], on="uid", how="left", validate="many_to_one")
    merged["design"] = merged["label"]
    merged["label"] = [f"{d}: {k}" for d, k in zip(merged["design"], merged["kind"], strict=True)]
    return merged.sort_values(["machine", "model", "device", "x_unit", "x", "design", "tier", "repeat"]).reset_index(
        drop=True
    )


def _cache_fraction(resolved: dict[str, Any]) -> float | None:
    """Share of all (layer, expert) blocks the cache holds: the sweep's unit when it sets no RAM budget."""
    if resolved.get("cache_fraction") is not None:
        return float(resolved["cache_fraction"])
    total = resolved.get("cache_slots_total")
    blocks = (resolved.get("num_experts") or 0) * len(resolved.get("moe_layers") or [])
    return total / blocks if total and blocks else None


def _gpu_name(env: dict[str, Any]) -> str | None:
    gpus = _get(env, "gpu", "gpus") or []
    return ", ".join(str(g.get("name")) for g in gpus) or None


def runs_frame(runs: list[Run]) -> pd.DataFrame:
    """One row per run, sorted by machine, model, device, policy, budget, repeat.

    `x` is the run's position on the sweep's axis in the sweep's own unit (`x_unit`): its RAM budget
    in GiB when it has one, else the share of the experts its cache holds, in percent. `eligible`
    says whether the run may be ranked and plotted: ok, and valid unless `include_invalid`.
    """
    frame = pd.DataFrame([_row(r) for r in runs])
    frame["budget_bytes"] = frame["ram_budget_bytes"].where(frame["ram_budget_bytes"].notna(), frame["cache_bytes"])
    has_budget = frame["ram_budget_bytes"].notna()
    frame["x"] = (frame["ram_budget_bytes"] / GIB).where(has_budget, frame["cache_fraction"] * 100)
    frame["x_unit"] = [BUDGET_UNIT if b else SHARE_UNIT for b in has_budget]
    frame["invalid"] = (frame["status"] == "ok") & (frame["valid"] == False)  # noqa: E712 (None is not invalid)
    columns = ["machine", "model", "device", "label", "x_unit", "x", "repeat"]
    return frame.sort_values(columns, na_position="last").reset_index(drop=True)


def mark_eligible(frame: pd.DataFrame, include_invalid: bool = False) -> pd.DataFrame:
    """Adds `eligible`: ok runs with a decode rate, INVALID ones only when asked for."""
    ok = (frame["status"] == "ok") & frame["decode_tokens_per_s"].notna()
    frame["eligible"] = ok if include_invalid else ok & ~frame["invalid"]
    return frame


def belady_bounds(runs: list[Run]) -> tuple[dict[str, float], str | None]:
    """Decode hit rate of Belady's optimum at each run's capacity, by Run.uid; and why it is missing, if it is."""
    try:
        from harness.trace.schema import read_trace
        from harness.trace.simulate import simulate
    except ImportError as exc:
        return {}, f"bound unavailable: trace simulator missing ({exc})"
    bounds: dict[str, float] = {}  # by Run.uid
    problems: list[str] = []
    for run in runs:
        resolved = run.result.get("resolved") or {}
        trace_path = run.file("trace", "trace.parquet")
        slots = resolved.get("cache_slots")
        if run.result.get("status") != "ok" or not trace_path.is_file() or not slots or run_stack(run.result):
            continue  # a tier stack has no single capacity to bound: its tiers are replayed by simulate --tiers
        try:
            replay = simulate(read_trace(trace_path), "belady", int(slots), resolved.get("scope") or "per-layer")
            bounds[run.uid] = replay.total("decode").hit_rate
        except (HarnessError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{run.run_id}: {exc}")
    if problems:
        log.warning("Belady bound failed for %d run(s): %s", len(problems), problems[0])
    reason = None if bounds else "bound unavailable: " + (problems[0] if problems else "no run with a trace")
    return bounds, reason
