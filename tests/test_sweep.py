"""Sweep files, cell expansion, the subprocess runner (failures, OOM, timeouts, resume) and the CLI."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from harness import budget
from harness.cli import main as cli_main
from harness.errors import ExitCode, HarnessError
from harness.results import read_json
from harness.sweep import OOM_REASON, SweepRunner, expand, load_sweep, parse_only, select

FAKE_CELL = [sys.executable, str(Path(__file__).with_name("fake_cell.py")), "{spec}", "{results}"]


def write_sweep(tmp_path: Path, data: dict, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_valid_sweep_expands_to_the_product_minus_exclusions(tmp_path):
    path = write_sweep(
        tmp_path,
        {
            "base": {"model": "models/m", "max_new_tokens": 8},
            "matrix": {"ram_budget": ["1GiB", "2GiB"], "policy": ["lru", "lfu", "arc"]},
            "exclude": [{"ram_budget": "1024MiB", "policy": ["lfu", "arc"]}],
        },
    )
    sweep = load_sweep(path)
    assert sweep.name == "s"
    cells = expand(sweep)
    # 2 x 3 = 6, minus (1 GiB, lfu) and (1 GiB, arc): the rule's 1024MiB is the same size as 1GiB.
    assert [(c.config["ram_budget"], c.config["policy"]) for c in cells] == [
        ("1GiB", "lru"),
        ("2GiB", "lru"),
        ("2GiB", "lfu"),
        ("2GiB", "arc"),
    ]
    assert all(c.spec.max_new_tokens == 8 and c.spec.model == "models/m" for c in cells)
    assert len({c.run_id for c in cells}) == 4


def test_repeats_are_interleaved_in_rounds(tmp_path):
    path = write_sweep(tmp_path, {"base": {"model": "m"}, "matrix": {"policy": ["a", "b", "c"]}, "repeats": 3})
    cells = expand(load_sweep(path))
    order = [(c.config["policy"], c.round) for c in cells]
    assert order == [("a", 0), ("b", 0), ("c", 0), ("c", 1), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("c", 2)]
    assert [c.spec.repeat for c in cells] == [c.round for c in cells]
    assert len({c.run_id for c in cells}) == 9
    assert [c.position for c in cells] == list(range(9))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"base": {"model": "m"}, "matrx": {}}, "matrx: unknown key"),
        ({"base": {"model": "m"}, "matrix": {"polcy": ["lru"]}}, "unknown run-spec key 'polcy' in matrix"),
        ({"base": {"model": "m", "bogus": 1}}, "unknown run-spec key 'bogus' in base"),
        ({"base": {"model": "m"}, "exclude": [{"nope": 1}]}, "exclude[0]"),
        ({"base": {"model": "m"}, "matrix": {"policy": []}}, "matrix.policy is an empty list"),
        ({"base": {"model": "m"}, "matrix": {"policy": ["lru", "lru"]}}, "lists a value twice"),
        ({"base": {"model": "m"}, "matrix": {"policy": "lru"}}, "matrix.policy"),
        ({"base": {"model": "m"}, "repeats": 0}, "repeats"),
        ({"base": {"model": "m", "policy": "lru"}, "matrix": {"policy": ["lfu"]}}, "policy is in both"),
        ({"base": {"model": "m"}, "cell_timeout": "soon"}, "cell_timeout"),
    ],
)
def test_malformed_sweep_files_name_the_key(tmp_path, data, message):
    with pytest.raises(HarnessError) as info:
        load_sweep(write_sweep(tmp_path, data))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_invalid_cell_names_the_cell(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, {"base": {"model": "m"}, "matrix": {"max_new_tokens": [4, 0]}}))
    with pytest.raises(HarnessError, match=r"cell max_new_tokens=0: invalid run spec: max_new_tokens"):
        expand(sweep)


def test_not_yaml_and_not_a_mapping_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: {model: m\nmatrix: [")
    with pytest.raises(HarnessError, match="not valid YAML"):
        load_sweep(bad)
    with pytest.raises(HarnessError, match="must be a mapping"):
        load_sweep(write_sweep(tmp_path, ["a", "b"]))
    with pytest.raises(HarnessError, match="cannot read sweep file"):
        load_sweep(tmp_path / "absent.yaml")


def test_only_filters_cells(tmp_path):
    sweep = load_sweep(
        write_sweep(tmp_path, {"base": {"model": "m"}, "matrix": {"ram_budget": ["1GiB", "2GiB"], "seed": [0, 1]}})
    )
    cells = expand(sweep)
    chosen = select(cells, parse_only(["ram_budget=2048MiB", "seed=1"]))
    assert [(c.config["ram_budget"], c.config["seed"]) for c in chosen] == [("2GiB", 1)]
    assert len(select(cells, parse_only(["seed=0", "seed=1"]))) == 4
    assert select(cells, parse_only([f"run_id={cells[0].run_id}"])) == [cells[0]]
    with pytest.raises(HarnessError, match="unknown key 'colour'"):
        parse_only(["colour=red"])
    with pytest.raises(HarnessError, match="KEY=VALUE"):
        parse_only(["seed"])
    with pytest.raises(HarnessError, match="no cell of the sweep matches"):
        select(cells, parse_only(["policy=nope"]))


def _cgroup_reason() -> str | None:
    hier = budget.detect_hierarchy()
    if hier is None:
        return "no memory cgroup controller"
    try:
        budget.remove_child(budget.create_child(hier, 2**28, "probe"))
    except OSError as exc:
        return f"cannot create memory cgroups: {exc}"
    return None


def test_failed_cells_are_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    log = tmp_path / "invocations.log"
    monkeypatch.setenv("FAKE_CELL_LOG", str(log))
    cgroup_reason = _cgroup_reason()
    policies = ["lru", "fake-crash"] + ([] if cgroup_reason else ["fake-hog"])
    sweep = load_sweep(
        write_sweep(
            tmp_path,
            {
                "base": {"model": "m", "ram_budget": "256MiB"},
                "matrix": {"policy": policies},
                "drop_caches": False,
            },
        )
    )
    cells = expand(sweep)
    results = tmp_path / "results"
    outcomes = {o.cell.config["policy"]: o for o in SweepRunner(sweep, results, command=FAKE_CELL).run(cells)}
    assert outcomes["lru"].status == "ok"
    assert read_json(results / cells[0].run_id / "result.json")["status"] == "ok"

    crash = read_json(results / outcomes["fake-crash"].cell.run_id / "result.json")
    assert crash["status"] == "failed"
    assert crash["error"].startswith("exited with status 1: RuntimeError: boom")
    assert "Traceback" in crash["failure"]["stderr_tail"]
    assert crash["failure"]["exit_status"] == 1
    assert crash["validity"]["valid"] is False
    assert crash["spec"]["policy"] == "fake-crash"

    if not cgroup_reason:
        hog = read_json(results / outcomes["fake-hog"].cell.run_id / "result.json")
        assert hog["error"] == OOM_REASON
        assert hog["failure"]["budget"]["oom_kills"] >= 1
        assert hog["failure"]["budget"]["mode"] == budget.detect_hierarchy().mode
        record = read_json(results / cells[0].run_id / "sweep.json")
        assert record["budget"]["limit_bytes"] == 256 * 2**20

    # Done cells are not run again (failed ones too with retry_failed off); --force runs them again.
    before = log.read_text().splitlines()
    again = SweepRunner(sweep, results, command=FAKE_CELL, retry_failed=False).run(cells)
    assert {o.status for o in again} == {"skipped"}
    assert log.read_text().splitlines() == before
    # By default a resumed sweep runs its failed cells again, and only those.
    retried = SweepRunner(sweep, results, command=FAKE_CELL).run(cells)
    assert [o.cell.config["policy"] for o in retried if o.ran] == policies[1:]
    before = log.read_text().splitlines()
    SweepRunner(sweep, results, command=FAKE_CELL, force=True).run(select(cells, parse_only(["policy=lru"])))
    assert log.read_text().splitlines() == [*before, cells[0].run_id]


def test_a_cell_over_its_time_limit_is_killed_and_recorded(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, {"base": {"model": "m"}, "cell_timeout": "1s", "drop_caches": False}))
    # `sh` starts in milliseconds, so the limit is not spent on interpreter start-up.
    outcome = SweepRunner(sweep, tmp_path / "r", command=["sh", "-c", "sleep 30", "{spec}"]).run(expand(sweep))[0]
    assert outcome.status == "failed"
    result = read_json(tmp_path / "r" / outcome.cell.run_id / "result.json")
    assert result["error"] == "timed out after 1 s (cell_timeout)"
    assert result["failure"]["exit_status"] == -9


def test_cell_command_must_take_the_spec(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, {"base": {"model": "m"}}))
    with pytest.raises(HarnessError, match="spec"):
        SweepRunner(sweep, tmp_path, command=["true"])


def test_cli_dry_run_lists_cells_and_what_is_done(tmp_path):
    path = write_sweep(tmp_path, {"base": {"model": "m"}, "matrix": {"policy": ["lru", "lfu"]}, "drop_caches": False})
    results = tmp_path / "results"
    cells = expand(load_sweep(path))
    SweepRunner(load_sweep(path), results, command=FAKE_CELL).run(cells[:1])
    out = CliRunner().invoke(cli_main, ["sweep", str(path), "--results", str(results), "--dry-run"])
    assert out.exit_code == 0, out.output
    lines = {c.run_id: line for c in cells for line in out.output.splitlines() if c.run_id in line}
    assert "ok" in lines[cells[0].run_id] and "policy=lru" in lines[cells[0].run_id]
    assert "to run" in lines[cells[1].run_id]
    assert not (results / cells[1].run_id).exists()


def test_piped_cli_output_keeps_a_long_cell_label_on_one_line(tmp_path):
    # rich squeezes tables to 80 columns off a terminal; a piped sweep must still name its cells whole.
    model = "models/" + "a-long-model-folder-name" * 3
    path = write_sweep(tmp_path, {"matrix": {"model": [model], "cache_experts": ["25%"], "policy": ["lru"]}})
    cell = expand(load_sweep(path))[0]
    assert len(cell.label()) > 80
    out = CliRunner().invoke(cli_main, ["sweep", str(path), "--results", str(tmp_path / "r"), "--dry-run"])
    assert out.exit_code == 0, out.output
    assert any(cell.run_id in line and cell.label() in line for line in out.output.splitlines()), out.output


def test_cli_refuses_a_bad_sweep_file_in_one_line(tmp_path):
    path = write_sweep(tmp_path, {"base": {"model": "m"}, "extra": 1})
    out = CliRunner().invoke(cli_main, ["sweep", str(path), "--dry-run"])
    assert out.exit_code == 2
    assert out.output.strip().splitlines() == [out.output.strip()]
    assert "extra: unknown key" in out.output


def test_cli_runs_cells_with_a_custom_command_and_reports_each(tmp_path):
    path = write_sweep(
        tmp_path, {"base": {"model": "m"}, "matrix": {"policy": ["lru", "fake-crash"]}, "drop_caches": False}
    )
    results = tmp_path / "results"
    command = " ".join(FAKE_CELL)
    out = CliRunner().invoke(cli_main, ["sweep", str(path), "--results", str(results), "--cell-command", command])
    assert out.exit_code == ExitCode.FAILED, out.output
    assert "ok " in out.output and "failed " in out.output
    assert "2 run, 0 already done, 1 failed" in out.output
    manifest = read_json(results / "sweep.json")
    assert [c["config"]["policy"] for c in manifest["cells"]] == ["lru", "fake-crash"]


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("workloads/sweeps/*.yaml")), ids=str)
def test_shipped_sweep_files_are_valid(path):
    sweep = load_sweep(path)
    cells = expand(sweep)
    assert cells and len({c.run_id for c in cells}) == len(cells)
