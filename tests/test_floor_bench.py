"""The floor benchmark's `--reads-only`: the runtime/fio read comparison alone, on a packed model."""

from click.testing import CliRunner

from harness.benchmarks.floor import main
from harness.ssd.engine import resolve_backend


def test_reads_only_compares_the_packs_reads_without_a_run(tiny_model, tmp_path):
    model = tiny_model("olmoe")
    args = ["--model", str(model), "--reads-only", "--read-seconds", "0.2", "--io-repeats", "1"]
    out = CliRunner().invoke(main, [*args, "--results", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "expert reads of" in out.output and "medians of 1 rounds at queue depth 4:" in out.output
    assert "  runtime " in out.output
    if resolve_backend() == "io_uring":  # the profiler's ring over the runtime loop's buffers, beside the runtime
        assert "  ring " in out.output and "  runtime/ring " in out.output
    assert not any(tmp_path.iterdir())  # no run


def test_reads_only_refuses_a_model_that_is_not_packed(tmp_path):
    out = CliRunner().invoke(main, ["--model", str(tmp_path / "no-model"), "--reads-only"])
    assert out.exit_code == 2 and "is not packed" in out.output


def test_reads_only_at_the_depths_given(tiny_model, tmp_path):
    args = ["--model", str(tiny_model("olmoe")), "--reads-only", "--read-seconds", "0.2", "--io-repeats", "1"]
    out = CliRunner().invoke(main, [*args, "--io-depths", "1,3", "--results", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "at queue depth 1 (given)" in out.output and "at queue depth 3 (given)" in out.output


def test_a_bad_depth_is_refused_in_one_line(tiny_model):
    out = CliRunner().invoke(main, ["--model", str(tiny_model("olmoe")), "--reads-only", "--io-depths", "1,deep"])
    assert out.exit_code == 2 and "'deep' is neither 'profile' nor a queue depth" in out.output
