"""`harness run`: one measurement of a model under a RAM budget with a cache policy; `harness rerun`: the
same run again from its result folder alone.

Exit status (harness.errors.ExitCode): 0 ok and valid, 2 bad input (nothing measured), 3 ran but INVALID
(result written), 4 failed (failure written), 130 interrupted. harness.run (torch) is imported inside the
commands, so `--help` stays light.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from harness.budget import CellCgroup, current_enforcement, enforceable, kill_reason
from harness.cli.console import make_console
from harness.errors import ExitCode, HarnessError
from harness.process import (
    BUDGET_CHILD_ENV,
    claim_run_dir,
    lock_held_env,
    sigterm_as_interrupt,
    start_child,
    stop_child,
)
from harness.result_model import RunResult, exit_code, load_result, parse_result, summary_row
from harness.spec import RunSpec, load_run_spec
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
    "min_steady_s",
    "io_engine",
    "io_threads",
    "io_depth",
    "seed",
    "repeat",
)


def _option(name: str, **kwargs: Any):  # returns a click decorator
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
@_option("min_steady_s", type=float)
@_option("io_engine", type=click.Choice(["auto", "direct", "buffered"]))
@_option("io_threads", type=int)
@_option("io_depth", type=int)
@_option("decode_threads", type=int)
@_option("device", type=click.Choice(["auto", "cpu", "cuda"]))
@_option("tiers")
@_option("vram_budget")
@_option("seed", type=int)
@_option("repeat", type=int)
@click.option(
    "--spec",
    "spec_file",
    type=click.Path(path_type=Path),
    help="A RunSpec as JSON, or a result.json (or its folder) to run that spec again; flags override it.",
)
@click.option(
    "--results",
    type=click.Path(path_type=Path),
    default=Path("results"),
    show_default=True,
    help="Folder that receives <run_id>/result.json, trace.parquet, timeline.parquet.",
)
@click.option("--quiet", is_flag=True, help="No live token display.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's key figures as one JSON object.")
@click.option("--force", is_flag=True, help="Replace the result of a run that already has one (else refused).")
def run(spec_file: Path | None, results: Path, quiet: bool, as_json: bool, force: bool, **flags: object) -> None:
    """Generate with experts offloaded to the SSD and record throughput, hits, bytes and latencies."""
    data = _spec_data(spec_file) if spec_file is not None else {}
    data.update({k: v for k, v in flags.items() if v is not None})
    if "model" not in data:
        raise HarnessError("--model is required (a model folder or a Hugging Face id in the local cache)")
    spec = load_run_spec(data)
    with sigterm_as_interrupt():
        result = _run(spec, results, quiet or as_json, as_json, replace=force)
    if isinstance(result, int):  # a budgeted child ran it and reported
        sys.exit(result)
    _report(result, results, as_json)
    sys.exit(exit_code(result))


@click.command("rerun")
@click.argument("result_dir", type=click.Path(path_type=Path))
@click.option(
    "--results",
    type=click.Path(path_type=Path),
    default=Path("results") / "rerun",
    show_default=True,
    help="Folder for the new run (not the original's: on the same machine and content the run_id is the same).",
)
@click.option("--quiet", is_flag=True, help="No live token display.")
def rerun(result_dir: Path, results: Path, quiet: bool) -> None:
    """Run RESULT_DIR's spec again and say whether the tokens are identical (exit 3 when they differ)."""
    original = load_result(result_dir)
    if original.status != "ok" or not original.generated:
        raise HarnessError(f"{result_dir} is a {original.status} run without tokens; nothing to compare")
    spec = load_run_spec(original.spec)
    if Path(results).resolve() == Path(result_dir).resolve().parent:
        raise HarnessError("--results must not be the original's folder: the rerun would replace it")
    with sigterm_as_interrupt():
        result = _run(spec, results, quiet, False, replace=True)
    if isinstance(result, int):  # a budgeted child ran it, reported and wrote the result
        result = load_result(Path(results) / spec.run_id)
    else:
        _report(result, results, False)
    changed = [k for k, v in (original.content or {}).items() if (result.content or {}).get(k) != v]
    if changed:
        click.echo(f"content differs from the original run: {', '.join(changed)}")
    same = [g.token_ids for g in original.generated] == [g.token_ids for g in result.generated or []]
    click.echo(f"tokens identical to {result_dir}: {'yes' if same else 'NO'}")
    sys.exit(exit_code(result) if same else ExitCode.INVALID)


def _spec_data(spec_file: Path) -> dict:
    """A RunSpec mapping from a spec file, or from a result.json / result folder (its recorded spec)."""
    path = Path(spec_file)
    if path.is_dir():
        return dict(load_result(path).spec)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HarnessError(f"cannot read spec {spec_file}: {exc}") from None
    if isinstance(data, dict) and "schema_version" in data and "spec" in data:
        return dict(parse_result(data, path).spec)
    if not isinstance(data, dict):
        raise HarnessError(f"spec {spec_file} must be a JSON object of run-spec fields")
    return data


def _run(spec: RunSpec, results: Path, quiet: bool, as_json: bool, *, replace: bool) -> RunResult | int:
    """Plan and run in this process; or, for a budget, in a child inside a memory cgroup: then the child's
    exit status (the child reported)."""
    from harness.run import Progress, preflight, run_cell

    preflight(spec)
    budget = spec.ram_budget_bytes
    if (
        budget is not None
        and enforceable(budget)
        and not os.environ.get(BUDGET_CHILD_ENV)
        and current_enforcement(budget).mode == "accounting-only"
    ):
        # Hold the whole run to the budget from its first allocation: run it as a child process started
        # inside a fresh memory cgroup (page cache included). A child never does this again.
        code = _run_in_cgroup(spec, results, quiet, as_json, replace)
        if code is not None:
            return code
    console = make_console(stderr=True, quiet=quiet)
    progress = Progress(
        on_prompt=lambda i, n, item: console.print(f"\n[bold]prompt {i + 1}/{n}[/] ({item.id}):", end=" "),
        on_token=lambda token: console.print(".", end="", highlight=False),
    )
    result = run_cell(spec, results, progress, replace=replace)
    console.print()
    return result


def _report(result: RunResult, results: Path, as_json: bool) -> None:
    if as_json:
        row = summary_row(result)
        row.update(exit_code=int(exit_code(result)), result=str(Path(results) / result.run_id / "result.json"))
        click.echo(json.dumps(row))
        return
    click.echo(_summary(result, Path(results)))
    if result.status == "failed":
        click.echo(f"error: run failed: {result.error}", err=True)


def _rate(value: float | None, unit: str, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} {unit}"


def _summary(result: RunResult, results: Path) -> str:
    """A few lines a person reads after a run; peers, skipped and failed runs lack cache figures."""
    where = results / result.run_id / "result.json"
    if result.status != "ok":
        return f"run {result.run_id} {result.status}: {result.error}\n  -> {where}"
    m, r = summary_row(result), result.resolved or {}
    slots = r.get("cache_slots_total")
    cache = (
        f"{slots} slots ({format_bytes(r['cache_bytes'])}, {100 * r['cache_fraction']:.0f}% of experts)"
        if slots is not None
        else "no expert cache of the harness's"
    )
    if r.get("tiers"):
        cache = f"tiers {','.join(r['tiers'])} ({format_bytes(r['cache_bytes'])} of slots)"
    per_token = m["ssd_read_bytes_per_token"]
    prefill = result.metrics.prefill_tokens_per_s if result.metrics else None
    reasons = result.validity.reasons if result.validity else []
    return (
        f"run {result.run_id}: strategy {r.get('strategy')}, policy {r.get('policy')} {r.get('scope')}, {cache}, "
        f"io {r.get('io_engine')}\n"
        f"  decode {_rate(m['decode_tokens_per_s'], 'tok/s')}, "
        f"prefill {_rate(prefill, 'tok/s', 1)}, "
        f"hit rate decode {_rate(m['hit_rate_decode'], '', 3).strip()}, "
        f"SSD {'n/a' if per_token is None else format_bytes(per_token)}/token\n"
        f"  validity: {'valid' if result.valid else 'INVALID'} {reasons}\n"
        f"  -> {where}"
    )


def _run_in_cgroup(spec: RunSpec, results: Path, quiet: bool, as_json: bool, replace: bool) -> int | None:
    """Run `spec` in a child inside a fresh memory cgroup; its exit status, or None when no cgroup could be made.

    The child dies with this process (PR_SET_PDEATHSIG); SIGTERM/SIGINT here stop it and remove the cgroup;
    this process holds the run folder's lock for it. A killed child is recorded as failed, named as killed by
    the memory limit only when the cgroup's own counters show an OOM kill.
    """
    from harness.run import check_output_dir, refuse_existing, write_failure

    run_dir = check_output_dir(Path(results) / spec.run_id)
    with claim_run_dir(run_dir) as inherited, CellCgroup(spec.ram_budget_bytes, f"run-{spec.run_id}") as cgroup:
        refuse_existing(run_dir, inherited, replace)
        if not cgroup.prefix:
            return None
        spec_path = run_dir / f".spec-{os.getpid()}.json"
        spec_path.write_text(json.dumps(spec.canonical()))
        argv = [sys.executable, "-m", "harness", "run", "--spec", str(spec_path), "--results", str(results)]
        argv += ["--quiet"] if quiet else []
        argv += ["--json"] if as_json else []
        proc = start_child([*cgroup.prefix, *argv], env={**lock_held_env(run_dir), BUDGET_CHILD_ENV: "1"})
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            stop_child(proc)
            raise
        reason = kill_reason(code, cgroup.counters())
        if reason is not None:
            reason = f"the run was {reason} (budget {spec.ram_budget}, {cgroup.mode})"
            write_failure(spec, results, HarnessError(reason))
            click.echo(f"error: {reason}", err=True)
            return int(ExitCode.FAILED)
    return code


commands: list[click.Command] = [run, rerun]
