"""A stand-in for `harness run` in sweep and report tests: `fake_cell.py SPEC.json RESULTS_DIR`.

Writes RESULTS_DIR/<run_id>/result.json in the shape `harness run` writes, plus a real
timeline.parquet / events.parquet (through Telemetry) and a small trace.parquet, with numbers
that depend on the spec (bigger budget: more hits, fewer bytes). The policy name picks a
misbehaviour instead: `fake-crash` (traceback, exit 1), `fake-hog` (allocates 512 MiB),
`fake-invalid` (an INVALID result, exit 3 as `harness run` does).
Appends the run_id to $FAKE_CELL_LOG when set.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from harness.results import Validity, environment, write_json_atomic
from harness.spec import RunSpec
from harness.telemetry import Telemetry
from harness.trace.schema import TraceMeta, TraceWriter

LAYERS = [0, 1]
EXPERTS = 8
TOP_K = 2
EXPERT_BYTES = 24576
STEPS = 12
PREFILL = 4


def main(spec_file: str, results: str) -> int:
    spec = RunSpec.model_validate(json.loads(Path(spec_file).read_text()))
    if os.environ.get("FAKE_CELL_LOG"):
        with open(os.environ["FAKE_CELL_LOG"], "a") as log:
            log.write(spec.run_id + "\n")
    if spec.policy == "fake-crash":
        raise RuntimeError("boom: the fake cell crashed on purpose")
    if spec.policy == "fake-hog":
        hog = bytearray(512 * 2**20)
        for i in range(0, len(hog), 4096):
            hog[i] = 1
    run_dir = Path(results) / spec.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    budget = spec.ram_budget_bytes or 2**30
    # Slots grow with the budget: 2 per layer at 256 MiB, all 8 at 1 GiB and above.
    slots = max(1, min(EXPERTS, budget // (128 * 2**20)))
    rng = np.random.default_rng(spec.seed + spec.repeat)
    writer = TraceWriter(
        TraceMeta("fake", "olmoe", len(LAYERS), LAYERS, EXPERTS, TOP_K, EXPERT_BYTES, "tests/fake_cell.py")
    )
    tel = Telemetry(100, gpu_index=None).start()
    tel.event("prefill_start", seq=0, tokens=PREFILL)
    for step in range(STEPS):
        phase = "prefill" if step == 0 else "decode"
        for layer in LAYERS:
            experts = [int(e) for e in rng.choice(EXPERTS, TOP_K, replace=False, p=_skew())]
            writer.add(0, step, step, phase, layer, experts, [0.6, 0.4])
            tel.event("expert_load", layer=layer, expert=experts[0], bytes=EXPERT_BYTES)
        time.sleep(0.01)
        tel.event("token", seq=0, phase=phase, step=step)
    tel.event("sequence_end", seq=0)
    telemetry = tel.stop(run_dir)
    writer.write(run_dir / "trace.parquet")
    hit_rate = slots / EXPERTS * (0.9 if spec.policy == "lfu" else 0.8)
    tps = 5.0 + 20.0 * hit_rate + rng.normal(0, 0.2)
    decode_tokens = STEPS - 1
    read_bytes = int((1 - hit_rate) * decode_tokens * len(LAYERS) * TOP_K * EXPERT_BYTES)
    hits = round(hit_rate * decode_tokens * len(LAYERS) * TOP_K)
    total = decode_tokens * len(LAYERS) * TOP_K
    per_layer = {str(layer): [hits // 2, (total - hits) // 2] for layer in LAYERS}
    validity = Validity()
    if spec.policy == "fake-invalid":
        validity.fail("the fake cell is INVALID on purpose")
    result = {
        "schema_version": 1,
        "run_id": spec.run_id,
        "status": "ok",
        "error": None,
        "spec": spec.canonical(),
        "resolved": {
            "architecture": "olmoe",
            "model_name": Path(spec.model).name,
            "random_init": True,
            "decode_mode": "teacher-forced",
            "scope": spec.scope,
            "policy": spec.policy,
            "strategy": spec.strategy,
            "cache_slots": int(slots),
            "cache_slots_total": int(slots) * len(LAYERS),
            "cache_bytes": int(slots) * len(LAYERS) * EXPERT_BYTES,
            "expert_bytes": EXPERT_BYTES,
            "num_experts": EXPERTS,
            "top_k": TOP_K,
            "moe_layers": LAYERS,
            "dense_bytes": 600_000,
            "io_engine": "direct",
            "budget_enforcement": "accounting-only",
            "ram_budget_bytes": spec.ram_budget_bytes,
            "ssd_path": spec.ssd,
            "expert_file": str(run_dir / "experts.bin"),
        },
        "metrics": {
            "prefill_tokens_per_s": 40.0,
            "decode_tokens_per_s": tps,
            "ttft_s": {"p50": 0.5, "p90": 0.6, "p99": 0.7, "mean": 0.55},
            "token_latency_s": {"p50": 1 / tps, "p90": 1.2 / tps, "p99": 1.5 / tps, "mean": 1.1 / tps},
            "hit_rate_decode": hit_rate,
            "hit_rate_prefill": 0.0,
            "hits": {
                "prefill": {"hits": 0, "misses": 4, "per_layer": {"0": [0, 2], "1": [0, 2]}},
                "decode": {"hits": hits, "misses": total - hits, "per_layer": per_layer},
            },
            "ssd_read_bytes": read_bytes,
            "ssd_read_bytes_per_token": read_bytes / decode_tokens,
            "expert_reads": total - hits,
            "expert_read_latency_s": {"p50": 1e-4, "p99": 1e-3},
            "expert_read_throughput_bytes_per_s": 1e9,
            "expert_wait_share_pct": 10.0,
            "peak_rss_bytes": 400 * 2**20,
            "decode_tokens": decode_tokens,
            "prefill_tokens": PREFILL,
            "routing": {"top10_share": 0.3, "consecutive_overlap": 0.4, "per_layer": {}},
        },
        "generated": [{"prompt_index": 0, "token_ids": [1, 2, 3]}],
        "environment": environment(),
        "storage": {"device": "fake0", "filesystem": "ext4"},
        "hardware_profile": None,
        "telemetry": telemetry,
        "validity": validity.to_dict(),
        "files": {"trace": "trace.parquet", "timeline": "timeline.parquet", "events": "events.parquet"},
    }
    write_json_atomic(run_dir / "result.json", result)
    return 0 if validity.valid else 3


def _skew() -> np.ndarray:
    weights = np.array([8, 6, 4, 3, 2, 1, 1, 1], dtype=float)
    return weights / weights.sum()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
