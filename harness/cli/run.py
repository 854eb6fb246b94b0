"""`harness run`: one measurement of a model under a RAM budget with a cache policy."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console

from harness.errors import HarnessError
from harness.paths import check_output_dir
from harness.spec import RunSpec, load_run_spec

if TYPE_CHECKING:
    from harness.budget import CellCgroup
from harness.units import format_bytes

_FLAGS = (
    "model",
    "ram_budget",
    "cache_experts",
    "scope",
    "policy",
    "strategy",
    "ssd",
    "workload",
    "prompt",
    "max_prompts",
    "max_new_tokens",
    "decode",
    "warmup_steps",
    "io_engine",
    "io_threads",
    "seed",
    "repeat",
)


def _option(name: str, **kwargs: object):  # returns a click decorator
    field = RunSpec.model_fields[name]
    return click.option(f"--{name.replace('_', '-')}", name, default=None, help=field.description, **kwargs)


@click.command("run")
@_option("model")
@_option("ram_budget")
@_option("cache_experts")
@_option("scope", type=click.Choice(["per-layer", "global"]))
@_option("policy")
@_option("strategy")
@_option("ssd")
@_option("workload")
@_option("prompt")
@_option("max_prompts", type=int)
@_option("max_new_tokens", type=int)
@_option("decode", type=click.Choice(["greedy", "teacher-forced"]))
@_option("warmup_steps", type=int)
@_option("io_engine", type=click.Choice(["auto", "direct", "buffered"]))
@_option("io_threads", type=int)
@_option("device", type=click.Choice(["auto", "cpu", "cuda"]))
@_option("seed", type=int)
@_option("repeat", type=int)
@click.option("--spec", "spec_file", type=click.Path(path_type=Path), help="A RunSpec as JSON (flags override it).")
@click.option(
    "--results",
    type=click.Path(path_type=Path),
    default=Path("results"),
    show_default=True,
    help="Folder that receives <run_id>/result.json, trace.parquet, timeline.parquet.",
)
@click.option("--quiet", is_flag=True, help="No live token display.")
def run(spec_file: Path | None, results: Path, quiet: bool, **flags: object) -> None:
    """Generate with experts offloaded to the SSD and record throughput, hits, bytes and latencies."""
    # Imported here, not at the top: `harness --help` must not pay for torch and transformers.
    from harness.budget import CellCgroup
    from harness.run import Progress, current_enforcement, execute, preflight

    data: dict = {}
    if spec_file is not None:
        try:
            data = json.loads(Path(spec_file).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise HarnessError(f"cannot read spec {spec_file}: {exc}") from None
        if not isinstance(data, dict):
            raise HarnessError(f"spec {spec_file} holds a JSON {type(data).__name__}, not an object of RunSpec fields")
    data.update({k: v for k, v in flags.items() if v is not None})
    if "model" not in data:
        raise HarnessError("--model is required (a model folder or a Hugging Face id in the local cache)")
    spec = load_run_spec(data)
    check_output_dir(results, "--results")
    preflight(spec)
    if spec.ram_budget_bytes is not None and current_enforcement(spec.ram_budget_bytes).mode == "accounting-only":
        # Hold the whole run to the budget from its first allocation: run it as a child process
        # started inside a fresh memory cgroup (page cache included) and report for it.
        with CellCgroup(spec.ram_budget_bytes, f"run-{spec.run_id}") as cgroup:
            if cgroup.prefix:
                sys.exit(_run_in_cgroup(cgroup, spec, results, quiet))
    console = Console(stderr=True, quiet=quiet)
    progress = Progress(
        on_prompt=lambda i, n, item: console.print(f"\n[bold]prompt {i + 1}/{n}[/] ({item.id}):", end=" "),
        on_token=lambda token: console.print(".", end="", highlight=False),
    )
    result = execute(spec, results, progress)
    console.print()
    click.echo(_summary(result, Path(results)))


def _rate(value: float | None, unit: str, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} {unit}"


def _summary(result: dict, results: Path) -> str:
    """A few lines a person reads after a run; peers and skipped cells lack cache figures."""
    where = results / result["run_id"] / "result.json"
    if result.get("status") == "skipped":
        return f"run {result['run_id']} skipped: {result.get('error')}\n  -> {where}"
    m, r = result["metrics"], result.get("resolved", {})
    slots = r.get("cache_slots_total")
    cache = (
        f"{slots} slots ({format_bytes(r['cache_bytes'])}, {100 * r['cache_fraction']:.0f}% of experts)"
        if slots is not None
        else "no expert cache of the harness's"
    )
    per_token = m.get("ssd_read_bytes_per_token")
    validity = result["validity"]
    return (
        f"run {result['run_id']}: strategy {r.get('strategy')}, policy {r.get('policy')} {r.get('scope')}, {cache}, "
        f"io {r.get('io_engine')}\n"
        f"  decode {_rate(m.get('decode_tokens_per_s'), 'tok/s')}, "
        f"prefill {_rate(m.get('prefill_tokens_per_s'), 'tok/s', 1)}, "
        f"hit rate decode {_rate(m.get('hit_rate_decode'), '', 3).strip()}, "
        f"SSD {'n/a' if per_token is None else format_bytes(per_token)}/token\n"
        f"  validity: {'valid' if validity['valid'] else 'INVALID'} {validity['reasons']}\n"
        f"  -> {where}"
    )


def _run_in_cgroup(cgroup: CellCgroup, spec: RunSpec, results: Path, quiet: bool) -> int:
    from harness.run import write_failure

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec.canonical(), handle)
    argv = [sys.executable, "-m", "harness", "run", "--spec", handle.name, "--results", str(results)]
    code = subprocess.call(cgroup.prefix + argv + (["--quiet"] if quiet else []))
    Path(handle.name).unlink(missing_ok=True)
    if code < 0 or (cgroup.counters().get("oom_kills") or 0) > 0:
        reason = (
            f"the run was killed by its memory limit {spec.ram_budget} ({cgroup.mode}, signal {-code}): the "
            "budget is too small for this model and workload"
        )
        write_failure(spec, results, HarnessError(reason))
        raise HarnessError(reason)
    return code


commands: list[click.Command] = [run]
