"""The floor benchmark's `--reads-only`: the runtime/fio read comparison alone, on a packed model."""

from click.testing import CliRunner

from harness.benchmarks.floor import main


def test_reads_only_compares_the_packs_reads_without_a_run(tiny_model, tmp_path):
    model = tiny_model("olmoe")
    args = ["--model", str(model), "--reads-only", "--read-seconds", "0.2", "--io-repeats", "1"]
    out = CliRunner().invoke(main, [*args, "--results", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "expert reads of" in out.output and "median of 1: runtime" in out.output
    assert not any(tmp_path.iterdir())  # no run


def test_reads_only_refuses_a_model_that_is_not_packed(tmp_path):
    out = CliRunner().invoke(main, ["--model", str(tmp_path / "no-model"), "--reads-only"])
    assert out.exit_code == 2 and "is not packed" in out.output
