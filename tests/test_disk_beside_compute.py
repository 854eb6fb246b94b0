"""The disk-beside-compute benchmark: pairs of reads alone and beside a resident decode, in alternating order, the
median ratio and the bound it sets; the decoding process ends with it; bad input in one line."""

from __future__ import annotations

import psutil
from click.testing import CliRunner

from harness.benchmarks import disk_beside_compute as bench
from harness.benchmarks.disk_beside_compute import main


def test_pairs_alternate_and_the_bound_is_printed(tiny_model, monkeypatch):
    rates = {True: 1.6e9, False: 2.0e9}  # beside decode, alone: the scripted disk reads 20% slower beside compute
    held: list[bool] = []
    real_hold = bench.DecodeBeside.hold

    def hold(self, compute):
        held.append(compute)
        real_hold(self, compute)

    monkeypatch.setattr(bench.DecodeBeside, "hold", hold)
    computing_at_reads: list[bool] = []

    def read_rate(experts, job, seed):
        computing_at_reads.append(held[-1])
        return rates[held[-1]]

    monkeypatch.setattr(bench, "read_rate", read_rate)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    args = ["--model", str(tiny_model("olmoe")), "--rounds", "3", "--read-seconds", "0.2", "--ramp-seconds", "0"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[1].startswith("pair 0 (alone, beside): alone   2000 MB/s, beside decode   1600 MB/s (0.800)")
    assert lines[2].startswith("pair 1 (beside, alone)") and lines[3].startswith("pair 2 (alone, beside)")
    assert "median beside/alone 0.800 (range 0.800-0.800) over 3 pairs" in out.output
    assert "cannot get below decode_floor_ratio 1.25 here" in out.output
    # Each read ran with the decoding process computing or stopped as its pair's order says; it ends stopped.
    assert computing_at_reads == [False, True, True, False, False, True] and held[-1] is False
    # The process is gone.
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before


def test_a_real_pair_on_the_tiny_model(tiny_model):
    args = ["--model", str(tiny_model("olmoe")), "--rounds", "1", "--read-seconds", "0.3", "--ramp-seconds", "0"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    assert "pair 0 (alone, beside): alone" in out.output and "ms per decode step beside the reads" in out.output


def test_bad_input_in_one_line(tmp_path):
    out = CliRunner().invoke(main, ["--model", str(tmp_path / "none")])
    assert out.exit_code == 2 and "is not packed" in out.output
    assert CliRunner().invoke(main, []).exit_code == 2
