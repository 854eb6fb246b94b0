"""Benchmark: is a model's routing realistic? Teacher-forced over real English text, it prints the
routing statistics and the LRU / LFU / Belady hit rates at 25% and 50% per-layer capacity beside the
range of real traces (README, "Routing of random-init models").

    python -m harness.benchmarks.routing --model models/olmoe-small [--tokens 2000] [--out trace.parquet]

Every token is its own step (one access per token, layer and selected expert), as in decoding. The
text is the default workload's prompts and references (unless --without-workload) followed by
CPython's bundled help text.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import torch

from harness.models.adapters import load_config
from harness.models.packer import pack_model, pack_paths
from harness.runtime.engine import OffloadEngine
from harness.runtime.recorder import RoutingRecorder, trace_meta
from harness.trace.schema import read_trace
from harness.trace.simulate import simulate
from harness.trace.stats import REAL_RANGE, routing_stats
from harness.workloads import load_workload

CHUNK_TOKENS = 512
"""Tokens per teacher-forced forward pass (a sequence of the trace)."""


def _text(with_workload: bool) -> str:
    import pydoc_data.topics

    help_text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    if not with_workload:
        return help_text
    return " ".join(f"{p.prompt}{p.reference or ''}" for p in load_workload("default")) + "\n" + help_text


@click.command()
@click.option("--model", "model_dir", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--tokens", type=int, default=2000, show_default=True, help="Tokens of text to route.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Keep the trace here.")
@click.option(
    "--with-workload/--without-workload",
    default=True,
    show_default=True,
    help="Start with the default workload's text; leave it out for a trace that trains a policy "
    "later evaluated on that workload.",
)
def main(model_dir: Path, tokens: int, out: Path | None, with_workload: bool) -> None:
    from transformers import AutoTokenizer

    index, _ = pack_model(model_dir)
    paths = pack_paths(model_dir)
    config = load_config(model_dir)
    meta = trace_meta(str(model_dir), config, index, "harness.benchmarks.routing (teacher-forced text)")
    sink = RoutingRecorder(meta, token_steps=True)
    engine = OffloadEngine(model_dir, index, paths["experts"], paths["dense"], sink=sink)
    engine.configure_cache(index.num_experts, "per-layer", "lru", seed=0, io_threads=4)
    ids = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True).encode(_text(with_workload))[:tokens]
    with torch.inference_mode():
        for seq, start in enumerate(range(0, len(ids), CHUNK_TOKENS)):
            chunk = ids[start : start + CHUNK_TOKENS]
            # Each token is its own step (one access per token, layer and expert), labelled decode.
            engine.ctx.seq_id, engine.ctx.phase, engine.ctx.first_pos = seq, "decode", 0
            engine.model(input_ids=torch.tensor([chunk]))
            engine.ctx.now += len(chunk)
    engine.close()
    path = out or Path(tempfile.mkdtemp()) / "routing.parquet"
    trace = read_trace(sink.writer.write(path))
    stats = routing_stats(trace)
    measured = {"top10_share": stats["top10_share"], "consecutive_overlap": stats["consecutive_overlap"]}
    for policy in ("lru", "lfu", "belady"):
        for pct in (25, 50):
            name = f"{policy}_hit_rate_{pct}pct"
            slots = round(pct / 100 * index.num_experts)
            measured[name] = simulate(trace, policy, slots, "per-layer").hit_rate
    click.echo(
        f"{model_dir}: {trace.num_rows} tokens, {len(index.moe_layers)} MoE layers, "
        f"{index.num_experts} experts, top-{index.top_k}"
    )
    click.echo(f"{'statistic (mean over layers)':<34}{'measured':>10}   real range   inside")
    inside = 0
    for name, value in measured.items():
        lo_hi = REAL_RANGE.get(name)
        ok = lo_hi is not None and lo_hi[0] <= value <= lo_hi[1]
        inside += ok
        span = f"{lo_hi[0]:.2f} - {lo_hi[1]:.2f}" if lo_hi else "     -     "
        click.echo(f"{name:<34}{value:>10.3f}   {span}   {'yes' if ok else ('-' if lo_hi is None else 'NO')}")
    click.echo(
        f"{inside} of {sum(1 for n in measured if n in REAL_RANGE)} statistics inside the real range; trace: {path}"
    )


if __name__ == "__main__":
    main()
