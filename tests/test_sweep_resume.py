"""A two-cell sweep of real `harness run` cells on the tiny model: interrupted after the first cell, resumed.

The cells run through tests/cell_wrapper.py, which logs every start and holds the second cell
until the test lets it go, so the interrupt lands inside the second cell every time.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from harness import budget
from harness.errors import ExitCode
from harness.results import read_json
from harness.sweep import expand, load_sweep

# `python -m harness` without depending on a harness/__main__.py.
CLI = [sys.executable, "-c", "import sys; from harness.cli import main; sys.exit(main())"]
# The sweep itself runs through the library, not the CLI: `harness.cli` imports torch, which costs
# 10 s or more per process on a busy 2-core machine (the CLI path is covered in test_sweep.py).
SWEEP = [
    sys.executable,
    "-c",
    "import shlex, sys\n"
    "from harness.sweep import SweepRunner, expand, load_sweep\n"
    "spec = load_sweep(sys.argv[1])\n"
    "outcomes = SweepRunner(spec, sys.argv[2], command=shlex.split(sys.argv[3])).run(expand(spec))\n"
    "print(' '.join(o.status for o in outcomes))\n",
]
WRAPPER = Path(__file__).with_name("cell_wrapper.py")
# Generous: two cold `harness run` starts (torch import) on a busy 2-core machine (seconds).
START_TIMEOUT_S = 180


def _wait_for(predicate, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"sweep exited early ({proc.returncode}): {proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting; sweep output: {proc.communicate()[0]}")
        time.sleep(0.1)


def test_interrupted_sweep_resumes_and_runs_each_cell_once(tmp_path, tiny_model):
    model = tiny_model("olmoe")
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "base": {"model": str(model), "max_new_tokens": 2, "max_prompts": 1, "ram_budget": "1536MiB"},
                "matrix": {"policy": ["lru", "lfu"]},
                # Dropping the whole page cache would slow every other process on the machine.
                "drop_caches": False,
            }
        )
    )
    first, second = expand(load_sweep(spec_path))
    results = tmp_path / "results"
    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / second.run_id).touch()
    starts = tmp_path / "starts.log"
    run_cell = [*CLI, "run", "--spec", "{spec}", "--results", "{results}", "--quiet"]
    cell_command = shlex.join([sys.executable, str(WRAPPER), str(starts), str(hold), "{run_id}", "--", *run_cell])
    sweep_argv = [*SWEEP, str(spec_path), str(results), cell_command]

    # A new session, so the test can send SIGINT to the whole group as a terminal's Ctrl-C does.
    proc = subprocess.Popen(
        sweep_argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    _wait_for(lambda: starts.is_file() and len(starts.read_text().split()) == 2, proc, START_TIMEOUT_S)
    os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0 and "KeyboardInterrupt" in output, output
    first_result = results / first.run_id / "result.json"
    assert read_json(first_result)["status"] == "ok"
    assert not (results / second.run_id / "result.json").exists()
    first_written = first_result.stat().st_mtime_ns

    (hold / second.run_id).unlink()
    resumed = subprocess.run(sweep_argv, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.split() == ["skipped", "ok"]

    # The second cell started twice (interrupted, then resumed); the first only once, never rerun.
    assert starts.read_text().split() == [first.run_id, second.run_id, second.run_id]
    assert first_result.stat().st_mtime_ns == first_written
    for cell in (first, second):
        result = read_json(results / cell.run_id / "result.json")
        assert result["status"] == "ok", result.get("error")
        assert result["spec"]["policy"] == cell.spec.policy
    hier = budget.detect_hierarchy()
    expected_mode = hier.mode if hier is not None else "accounting-only"
    second_result = read_json(results / second.run_id / "result.json")
    assert second_result["resolved"]["budget_enforcement"] in (expected_mode, "accounting-only")
    record = read_json(results / second.run_id / "sweep.json")
    # `harness run` exits 3 for an INVALID result (two tokens are too few steady-state steps), 0 for a valid one.
    assert record["exit_status"] == (ExitCode.OK if second_result["validity"]["valid"] else ExitCode.INVALID)
    if record["budget"]["mode"] != "accounting-only":
        assert second_result["resolved"]["budget_enforcement"] == record["budget"]["mode"]
        assert record["budget"]["limit_bytes"] == 1536 * 2**20
