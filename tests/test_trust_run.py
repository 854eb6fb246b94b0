"""Trust under automation: exit codes of run and sweep, content-addressed run ids, machine identity, the
typed result's version check, reruns from a result folder, the run-folder lock, and process hygiene
(no re-exec for a budget no cgroup can hold, no child left behind)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from click.testing import CliRunner

from harness import budget
from harness.budget import OOM_REASON, CellCgroup, current_enforcement, kill_reason
from harness.cli import main as cli_main
from harness.errors import ExitCode, HarnessError
from harness.identity import MACHINE_ENV
from harness.models.factory import create_model
from harness.models.packer import pack_model
from harness.process import BUDGET_CHILD_ENV, claim_run_dir
from harness.report.load import find_runs
from harness.result_model import load_result
from harness.results import read_json
from harness.spec import RunSpec
from harness.sweep import SweepRunner, expand, load_sweep

FAKE_CELL = [sys.executable, str(Path(__file__).with_name("fake_cell.py")), "{spec}", "{results}"]
PROMPT = "the quick brown fox jumps over the lazy dog"
# Enough decode steps for a valid result: 16 steady-state steps after no warm-up.
VALID_TOKENS = "17"
# Generous: a cold `harness run` start (torch import) on a busy 2-core machine (seconds).
START_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny packed model of this module's own, so tests may change its weights."""
    out = tmp_path_factory.mktemp("trust") / "tiny-olmoe"
    create_model("olmoe", "tiny", out, seed=0)
    pack_model(out)
    return out


def _sweep(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"drop_caches": False, **data}))
    return path


def _cli(*args: str) -> tuple[int, str]:
    out = CliRunner().invoke(cli_main, list(args), env={"COLUMNS": "200"})  # rich wraps tables to the width
    return out.exit_code, out.output


def _run_args(model: Path, results: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(model), "--prompt", PROMPT, "--decode", "greedy", "--max-new-tokens", VALID_TOKENS,
            "--warmup-steps", "0", "--min-steady-s", "0", "--results", str(results), "--quiet", *extra]  # fmt: skip


# Exit codes


@pytest.mark.parametrize(
    ("policies", "code"),
    [(["lru", "lfu"], ExitCode.OK), (["lru", "fake-invalid"], ExitCode.INVALID), (["fake-crash"], ExitCode.FAILED)],
)
def test_sweep_exit_code_table_and_json(tmp_path, policies, code):
    path = _sweep(tmp_path, {"base": {"model": "m"}, "matrix": {"policy": policies}})
    command = " ".join(FAKE_CELL)
    exit_code, output = _cli("sweep", str(path), "--results", str(tmp_path / "r"), "--cell-command", command, "--json")
    assert exit_code == code, output
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["exit_code"] == code
    assert [c["cell"] for c in summary["cells"]] == [f"policy={p}" for p in policies]
    lru = next((c for c in summary["cells"] if c["cell"] == "policy=lru"), None)
    if lru is not None:
        assert lru["status"] == "ok" and lru["valid"] is True and lru["decode_tokens_per_s"] > 0
    if "fake-invalid" in policies:
        assert summary["cells"][1]["valid"] is False and summary["cells"][1]["status"] == "ok"


def test_sweep_table_names_every_cell(tmp_path):
    path = _sweep(tmp_path, {"base": {"model": "m"}, "matrix": {"policy": ["lru", "fake-crash"]}})
    code, output = _cli("sweep", str(path), "--results", str(tmp_path / "r"), "--cell-command", " ".join(FAKE_CELL))
    assert code == ExitCode.FAILED
    for header in ("status", "validity", "decode tok/s", "hit rate"):
        assert header in output
    assert "1 failed" in output


def test_run_exit_codes_ok_invalid_failed_and_bad_input(model, tmp_path, monkeypatch):
    code, output = _cli(*_run_args(model, tmp_path / "ok"))
    assert code == ExitCode.OK, output
    # The same run again does not silently replace the first result.
    written = next((tmp_path / "ok").rglob("result.json")).stat().st_mtime_ns
    code, output = _cli(*_run_args(model, tmp_path / "ok"))
    assert code == ExitCode.BAD_INPUT and "already has a result" in output and "--force" in output
    assert next((tmp_path / "ok").rglob("result.json")).stat().st_mtime_ns == written
    code, output = _cli(*_run_args(model, tmp_path / "bad", "--policy", "nope"))
    assert code == ExitCode.BAD_INPUT and "unknown policy" in output
    code, output = _cli(*_run_args(model, tmp_path / "bad", "--prompt", " "))
    assert code == ExitCode.BAD_INPUT and "the prompt is empty" in output
    # Longer than the model's positions (the tiny preset has 1024): refused before the model loads.
    code, output = _cli(*_run_args(model, tmp_path / "bad", "--prompt", "word " * 1100))
    assert code == ExitCode.BAD_INPUT and "max_position_embeddings" in output
    assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").rglob("result.json"))

    from harness import run as run_module

    original_assess = run_module.assess

    def invalid(plan, m, metrics, validity):
        original_assess(plan, m, metrics, validity)
        validity.fail("made INVALID by the test")

    monkeypatch.setattr(run_module, "assess", invalid)
    code, output = _cli(*_run_args(model, tmp_path / "invalid", "--json"))
    assert code == ExitCode.INVALID, output
    assert json.loads(output.strip().splitlines()[-1])["valid"] is False

    def crash(*args, **kwargs):
        raise RuntimeError("the test broke generation")

    monkeypatch.setattr(run_module, "generate", crash)
    code, output = _cli(*_run_args(model, tmp_path / "failed", "--json"))
    assert code == ExitCode.FAILED, output
    row = json.loads(output.strip().splitlines()[-1])
    result = load_result(Path(row["result"]))
    assert result.status == "failed" and "the test broke generation" in result.error
    assert result.traceback and "RuntimeError" in result.traceback
    # The trackers were stopped and nothing partial is left in the folder.
    folder = Path(row["result"]).parent
    assert not [p for p in folder.iterdir() if p.name.endswith((".partial", ".tmp")) or p.name.startswith(".spec-")]


# Content-addressed runs and machine identity


def test_resume_reruns_a_cell_whose_prompt_file_or_weights_changed(model, tmp_path, monkeypatch):
    log = tmp_path / "cells.log"
    monkeypatch.setenv("FAKE_CELL_LOG", str(log))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "one"}) + "\n")
    sweep = load_sweep(_sweep(tmp_path, {"base": {"model": str(model), "workload": str(prompts)}}))
    results = tmp_path / "r"

    def run() -> list[str]:
        outcomes = SweepRunner(sweep, results, command=FAKE_CELL).run(expand(sweep))
        return [o.cell.run_id for o in outcomes if o.ran]

    first = run()
    assert len(first) == 1 and run() == []  # done: not run again
    prompts.write_text(json.dumps({"id": "a", "prompt": "two"}) + "\n")
    second = run()
    assert len(second) == 1 and second != first
    # New weights (the checkpoint rewritten with another seed): the sweep repacks, and the cell runs again.
    create_model("olmoe", "tiny", model, seed=1, force=True)
    third = run()
    assert len(third) == 1 and third[0] not in (*first, *second)
    assert log.read_text().split() == [*first, *second, *third]
    content = [read_json(results / i / "result.json")["spec"] for i in (*first, *second, *third)]
    assert len({json.dumps(c, sort_keys=True) for c in content}) == 1  # same spec, three contents


def test_two_machines_keep_both_results_in_one_folder(tmp_path, monkeypatch):
    sweep = load_sweep(_sweep(tmp_path, {"base": {"model": "m"}}))
    results = tmp_path / "r"
    ids = []
    for machine in ("machine-a", "machine-b"):
        monkeypatch.setenv(MACHINE_ENV, machine)
        outcome = SweepRunner(sweep, results, command=FAKE_CELL).run(expand(sweep))[0]
        assert outcome.ran and outcome.status == "ok"
        ids.append(outcome.cell.run_id)
    assert len(set(ids)) == 2
    runs = find_runs([results])
    assert sorted(r.run_id for r in runs) == sorted(ids)


def test_result_records_content_and_machine(model, tmp_path, monkeypatch):
    monkeypatch.setenv(MACHINE_ENV, "pinned")
    from harness.run import run_cell

    spec = RunSpec(model=str(model), prompt=PROMPT, decode="greedy", max_new_tokens=2, warmup_steps=0)
    result = run_cell(spec, tmp_path)
    assert result.run_id == spec.run_id and result.machine["fingerprint"] == "pinned"
    assert result.machine["host"] and result.machine["logical_cores"] >= 1
    assert result.content["experts"] and result.content["dense"] and result.content["tokenizer"]


# Typed result


def test_report_loader_refuses_an_unknown_schema_version(tmp_path):
    folder = tmp_path / "r" / "abc"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"schema_version": 99, "run_id": "abc", "status": "ok"}))
    with pytest.raises(HarnessError, match="schema version 99"):
        find_runs([tmp_path / "r"])
    code, output = _cli("report", str(tmp_path / "r"), "--out", str(tmp_path / "out"))
    assert code == ExitCode.BAD_INPUT
    assert output.strip().splitlines() == [output.strip()] and "schema version 99" in output


def test_run_spec_from_a_result_reproduces_the_tokens(model, tmp_path):
    code, output = _cli(*_run_args(model, tmp_path / "first", "--json"))
    assert code == ExitCode.OK, output
    first = Path(json.loads(output.strip().splitlines()[-1])["result"])
    code, output = _cli("run", "--spec", str(first), "--results", str(tmp_path / "again"), "--quiet", "--json")
    assert code == ExitCode.OK, output
    again = Path(json.loads(output.strip().splitlines()[-1])["result"])
    tokens = [g.token_ids for g in load_result(first).generated]
    assert tokens == [g.token_ids for g in load_result(again).generated] and len(tokens[0]) == int(VALID_TOKENS)
    code, output = _cli("rerun", str(first.parent), "--results", str(tmp_path / "rerun"), "--quiet")
    assert code == ExitCode.OK and "tokens identical" in output and "yes" in output


# Process hygiene


def test_a_second_writer_of_the_same_run_is_refused(model, tmp_path):
    spec = RunSpec(model=str(model), prompt=PROMPT, decode="greedy", max_new_tokens=2, min_steady_s=0)
    with claim_run_dir(tmp_path / spec.run_id):
        code, output = _cli(*_run_args(model, tmp_path, "--max-new-tokens", "2", "--warmup-steps", "2"))
    assert code == ExitCode.BAD_INPUT and "is being written by pid" in output
    assert not (tmp_path / spec.run_id / "result.json").exists()


def test_a_sweep_leaves_a_cell_that_another_writer_holds(tmp_path):
    sweep = load_sweep(_sweep(tmp_path, {"base": {"model": "m"}, "matrix": {"policy": ["lru", "lfu"]}}))
    cells = expand(sweep)
    results = tmp_path / "r"
    with claim_run_dir(results / cells[0].run_id):
        outcomes = SweepRunner(sweep, results, command=FAKE_CELL).run(cells)
    assert [(o.ran, o.status) for o in outcomes] == [(False, "skipped"), (True, "ok")]
    assert "is being written by pid" in outcomes[0].reason
    assert not (results / cells[0].run_id / "result.json").exists()


def test_a_budget_no_cgroup_can_hold_runs_once_accounting_only(model, tmp_path, monkeypatch):
    assert current_enforcement(5 * 10**18).mode == "accounting-only"
    assert CellCgroup(5 * 10**18, "huge").prefix == []
    # From the command line such budgets never get this far: harness.units refuses sizes above 1 EiB
    # (2^60, below the 2^62 that reads as no limit) and the ambiguous TB, before any child could start.
    started = []
    monkeypatch.setattr("harness.cli.run.start_child", lambda *a, **k: started.append(a))
    for budget_text, needle in (("5000000TB", "ambiguous"), ("5000000TiB", "beyond 1 EiB"), ("1e30", "beyond 1 EiB")):
        code, output = _cli(*_run_args(model, tmp_path, "--ram-budget", budget_text))
        assert code == ExitCode.BAD_INPUT and needle in output, output
    assert started == []


def test_a_kill_is_blamed_on_the_memory_limit_only_with_an_oom_count():
    assert kill_reason(-9, {"oom_kills": 1, "limit_bytes": 2**30}) == OOM_REASON
    assert kill_reason(-9, {"oom_kills": 0, "limit_bytes": 2**30}) == "killed by signal SIGKILL"
    assert kill_reason(-15, {"oom_kills": None, "limit_bytes": None}) == "killed by signal SIGTERM"
    assert kill_reason(0, {"oom_kills": 0}) is None


def _cgroup_reason() -> str | None:
    hier = budget.detect_hierarchy()
    if hier is None:
        return "no memory cgroup controller"
    try:
        budget.remove_child(budget.create_child(hier, 2**28, "probe"))
    except OSError as exc:
        return f"cannot create memory cgroups: {exc}"
    return None


def _wait_for(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_sigterm_to_a_budgeted_run_leaves_no_process_or_cgroup(model, tmp_path):
    reason = _cgroup_reason()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop(BUDGET_CHILD_ENV, None)
    argv = [sys.executable, "-m", "harness", *_run_args(model, tmp_path, "--ram-budget", "3GiB")]
    argv[argv.index("--max-new-tokens") + 1] = "100000"
    parent = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    proc = psutil.Process(parent.pid)
    _wait_for(lambda: proc.children(recursive=True) or parent.poll() is not None, START_TIMEOUT_S)
    assert parent.poll() is None, parent.stderr.read()
    children = proc.children(recursive=True)
    hier = budget.detect_hierarchy()
    cgroups = list(hier.path.glob(f"{budget.CHILD_PREFIX}{parent.pid}-*"))
    assert cgroups
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=60) == ExitCode.INTERRUPTED
    _wait_for(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children), 30)
    assert not any(c.exists() for c in cgroups)
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".spec-") or p.name.endswith(".partial")]


def test_sigkill_to_a_sweep_stops_its_cell(tmp_path):
    sweep_file = _sweep(tmp_path, {"base": {"model": "m"}})
    marker = tmp_path / "cell.pid"
    cell = [sys.executable, "-c", f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); "
            "time.sleep(120)", "{spec}"]  # fmt: skip
    script = (
        "import sys\nfrom harness.sweep import SweepRunner, expand, load_sweep\n"
        f"spec = load_sweep({str(sweep_file)!r})\n"
        f"SweepRunner(spec, {str(tmp_path / 'r')!r}, command={cell!r}).run(expand(spec))\n"
    )
    sweep = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()})
    _wait_for(lambda: marker.is_file() and marker.read_text(), 120)
    cell_pid = int(marker.read_text())
    sweep.kill()
    sweep.wait()
    _wait_for(lambda: not psutil.pid_exists(cell_pid) or psutil.Process(cell_pid).status() == "zombie", 30)
