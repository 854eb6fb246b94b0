"""The held-out protocol: `seq:N` and `frac:F` splits by hand, `simulate --split` (profile from the training
part, every policy and both bounds scored on the held-out part only) and its CLI."""

import json

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.errors import HarnessError
from harness.trace.schema import TraceMeta, TraceWriter, read_trace
from harness.trace.simulate import ORACLES, run_simulation
from harness.trace.split import parse_split, split_trace


def write(path, sequences: dict[int, list[list[int]]], experts: int = 6):
    """One layer (0); sequences[seq] lists each decode step's experts; steps are numbered across sequences."""
    writer = TraceWriter(TraceMeta("toy", "toy", 1, [0], experts, 1, 0, "hand-made test trace"))
    step = 0
    for seq, steps in sequences.items():
        for pos, ex in enumerate(steps):
            writer.add(seq, pos, step, "decode", 0, ex, None)
            step += 1
    return writer.write(path)


def test_parse_split():
    assert str(parse_split("seq:3")) == "seq:3" and str(parse_split("frac:0.7")) == "frac:0.7"
    for bad in ("seq:0", "frac:1", "frac:0", "frac:x", "session:1", "3"):
        with pytest.raises(HarnessError, match="cannot read split"):
            parse_split(bad)


def test_split_by_sequence_and_by_share_of_steps(tmp_path):
    trace = read_trace(write(tmp_path / "t.parquet", {0: [[0]] * 4, 1: [[1]] * 4, 2: [[2]] * 2}))
    train, heldout = split_trace(trace, parse_split("seq:2"))
    assert [s.seq_id for s in train.sequences] == [0, 1] and [s.seq_id for s in heldout.sequences] == [2]
    # 10 steps: frac:0.5 cuts before step 5, inside sequence 1 (steps 4-7).
    train, heldout = split_trace(trace, parse_split("frac:0.5"))
    assert [(s.seq_id, s.step.tolist()) for s in train.sequences] == [(0, [0, 1, 2, 3]), (1, [4])]
    assert [(s.seq_id, s.step.tolist()) for s in heldout.sequences] == [(1, [5, 6, 7]), (2, [8, 9])]
    with pytest.raises(HarnessError, match="leaves nothing held out"):
        split_trace(trace, parse_split("seq:3"))
    with pytest.raises(HarnessError, match="leaves an empty part"):
        split_trace(trace, parse_split("frac:0.05"))


def test_simulate_split_profiles_the_training_part_and_scores_the_rest(tmp_path):
    # Training part (seq 0): 0 and 1 are frequent. Held out (seq 1): 2, 3, 0, 2, 3, 0 with 1 slot.
    path = write(tmp_path / "t.parquet", {0: [[0], [1], [0], [1], [0]], 1: [[2], [3], [0], [2], [3], [0]]})
    run = run_simulation(path, ["lru", "static"], "1", split="seq:1")
    assert run.split == "seq:1" and run.heldout_only and run.seq_ids == [1]
    hits = {r.policy: (r.total().hits, r.total().misses) for r in run.results}
    # LRU: every step misses. static (profile: 0 first): 2 fills the free slot, 0 replaces it at t2 and then
    # stays (2 and 3 rank below it): one hit at t5. The static-frequency oracle of the held-out part ranks
    # 0, 2, 3 equal by count (2 each), ties by key: 0 stays once in, the same as the profile here.
    assert hits["lru"] == (0, 6) and hits["static"] == (1, 5) and hits["static-oracle"] == (1, 5)
    assert set(ORACLES) <= set(hits) and hits["belady"][0] >= hits["lru"][0]
    with pytest.raises(HarnessError, match="needs a frequency profile"):
        run_simulation(path, ["static"], "1")


def test_cli_simulate_split_prints_both_bounds_and_records_the_split(tmp_path):
    path = write(tmp_path / "t.parquet", {0: [[0], [1], [0], [1], [0]], 1: [[2], [3], [0], [2], [3], [0]]})
    out = tmp_path / "out"
    args = ["simulate", "--trace", str(path), "--policy", "lru,static", "--capacity", "1", "--split", "frac:0.5"]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps lines at the terminal width
    assert "static-oracle (bound)" in text and "belady (bound)" in text
    assert "held-out part of split frac:0.5" in text
    summary = json.loads((out / "simulation.json").read_text())
    assert summary["split"] == "frac:0.5" and summary["bounds"] == list(ORACLES)
    import pandas as pd

    frame = pd.read_csv(out / "simulation.csv")
    assert set(frame["split"]) == {"frac:0.5"} and set(frame[frame["bound"]]["policy"]) == set(ORACLES)
    bad = CliRunner().invoke(main, ["simulate", "--trace", str(path), "--split", "frac:2"])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1


def test_static_reads_a_profile_from_another_trace_file(tmp_path):
    # The profile trace ranks 3 above 2. Replayed on 2, 3, 2, 3 with 1 slot: t0 2 takes the free slot, t1 3
    # ranks above it and replaces it, t2 2 streams, t3 hits 3.
    profile = write(tmp_path / "p.parquet", {0: [[3], [3], [2]]})
    path = write(tmp_path / "t.parquet", {0: [[2], [3], [2], [3]]})
    run = run_simulation(path, [f"static:{profile}"], "1")
    result = next(r for r in run.results if r.policy.startswith("static:"))
    assert (result.total().hits, result.total().misses) == (1, 3)
    assert any("honest only where that is another trace" in note for note in run.notes)
