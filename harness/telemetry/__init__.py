"""Telemetry beside every run: a sampler thread (disk, CPU, RSS, memory, GPU) and a run event log.

Usage from `harness run`:

    tel = Telemetry(spec.telemetry_hz, path=expert_file, cgroup_path=enforcement.cgroup_path).start()
    tel.event("prefill_start", seq_id=0)
    ...
    result["telemetry"] = tel.stop(run_dir)   # writes timeline.parquet and events.parquet

Event names the report understands: `prefill_start`, `prefill_end`, `decode_start`, `decode_end`
(field `seq_id`), `token` (`seq_id`, `pos`, `phase`), `expert_load` (`layer`, `expert`, `bytes`,
`duration_s`).
"""

from harness.telemetry.recorder import EVENTS_FILE, TIMELINE_FILE, Telemetry, read_timeline

__all__ = ["EVENTS_FILE", "TIMELINE_FILE", "Telemetry", "read_timeline"]
