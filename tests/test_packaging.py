"""The repository is self-contained: workloads ship inside the package, and a non-editable install finds them."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.workloads import PACKAGED_WORKLOADS, load_workload

ROOT = Path(__file__).resolve().parents[1]
SIBLING = "sh" + "ared"
"""The folder beside the checkout that a clone does not have (spelled apart: this file checks itself too)."""


def test_shipped_workloads_are_package_data():
    assert PACKAGED_WORKLOADS.is_relative_to(ROOT / "harness")
    assert (PACKAGED_WORKLOADS / "sweeps" / "default.yaml").is_file()
    assert load_workload("default")
    # The top-level folder the DESIGN names is the same folder.
    assert (ROOT / "workloads").resolve() == PACKAGED_WORKLOADS.resolve()


def test_tests_need_nothing_outside_the_repository():
    outside = ("../" + SIBLING, f'"{SIBLING}"')
    for path in sorted((ROOT / "tests").glob("*.py")):
        assert not any(text in path.read_text() for text in outside), path


def test_readme_points_only_inside_the_repository():
    assert "../" + SIBLING not in (ROOT / "README.md").read_text()


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="setuptools is not installed")
def test_non_editable_install_finds_the_default_workload(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT / "harness", source / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target)]
    subprocess.run([*pip, str(source)], check=True, capture_output=True, timeout=300)
    probe = (
        "from harness.workloads import PACKAGED_WORKLOADS as W, load_workload; "
        "print(W, len(load_workload('default')), (W / 'sweeps/default.yaml').is_file())"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True, timeout=120
    )
    folder, prompts, sweep = done.stdout.split()
    assert Path(folder).is_relative_to(target) and int(prompts) > 0 and sweep == "True"
