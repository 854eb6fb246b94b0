"""Ray stays optional: never imported without --cluster; with --cluster and no Ray, one line saying what to install."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from harness.cli import main as cli_main


def test_ray_is_not_imported_without_cluster(tmp_path):
    code = (
        "import sys\n"
        "from harness.cli import main\n"
        "import harness.sweep, harness.trace.simulate, harness.report, harness.predict\n"
        "try:\n"
        "    main(['sweep', 'workloads/sweeps/tiny.yaml', '--dry-run', '--results', sys.argv[1]])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_cluster_without_ray_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    trace = tmp_path / "t.parquet"
    trace.write_bytes(b"")
    for args in (
        ["simulate", "--trace", str(trace), "--cluster", "auto"],
        ["sweep", "workloads/sweeps/tiny.yaml", "--results", str(tmp_path / "r"), "--cluster", "auto"],
        ["node", "start", "--dry-run"],
    ):
        out = CliRunner().invoke(cli_main, args)
        assert out.exit_code == 2, (args, out.output)
        expected = "error: Ray is not installed: install the cluster extra: pip install 'harness[cluster]'"
        assert out.output.strip() == expected
