"""The CLI starts light: `--help`, `--version` and every subcommand's `--help` import no torch or transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import harness

HEAVY = ("torch", "transformers", "pandas", "pyarrow", "matplotlib")

# Runs in a fresh interpreter: this test process has torch loaded already.
_PROBE = """
import json, sys
import click
from click.testing import CliRunner
from harness.cli import main

def paths(command, prefix):
    yield prefix
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from paths(sub, [*prefix, name])

helped = []
for path in [[], *paths(main, [])]:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, (path, result.output)
    helped.append(" ".join(path))
version = CliRunner().invoke(main, ["--version"])
print(json.dumps({"helped": helped, "version": version.output, "loaded": [m for m in %r if m in sys.modules]}))
"""


def _probe() -> dict:
    root = Path(harness.__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE % (HEAVY,)], capture_output=True, text=True, env=env, check=True, timeout=120
    )
    return json.loads(done.stdout)


def test_help_and_version_import_nothing_heavy():
    probe = _probe()
    assert probe["loaded"] == []
    assert probe["version"].strip() == f"harness {harness.__version__}"
    # Every family of commands was asked for its help, nested groups included.
    for command in ("run", "sweep", "simulate", "trace import", "trace info", "model create", "profile-ssd"):
        assert command in probe["helped"]
