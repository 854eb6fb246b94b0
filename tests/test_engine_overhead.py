"""The engine-overhead benchmark's interleaved mode: engines side by side in one process, sequences alternating."""

from click.testing import CliRunner

from harness.benchmarks import engine_overhead
from harness.benchmarks.engine_overhead import main


def test_interleaved_rounds_alternate_the_order_and_pair_the_differences(tiny_model, monkeypatch):
    real_generate = engine_overhead.generate
    order: list[tuple[int, int]] = []
    """(round, the engine's model) of each sequence, in the order they ran."""

    def recording_generate(model, ids, tokens, mode, ref, ctx, seq_id, decode_threads=None):
        order.append((seq_id, id(model)))
        return real_generate(model, ids, tokens, mode, ref, ctx, seq_id, decode_threads=decode_threads)

    monkeypatch.setattr(engine_overhead, "generate", recording_generate)
    args = ["--model", str(tiny_model("olmoe")), "--cache-experts", "50%", "--tokens", "3"]
    out = CliRunner().invoke(main, [*args, "--strategy", "cache", "--strategy", "prefetch", "--interleaved", "3"])
    assert out.exit_code == 0, out.output
    assert "3 rounds" not in out.output and "2 rounds of 3 tokens in one process" in out.output  # round 0 left out
    lines = out.output.splitlines()
    assert lines[1].split()[0] == "cache" and "against" not in lines[1]
    assert lines[2].split()[0] == "prefetch" and "against cache in the same round" in lines[2]
    # Each round runs both engines once, the second round in the reverse order of the first and third.
    by_round = [[who for r, who in order if r == round_] for round_ in range(3)]
    assert all(len(set(r)) == 2 for r in by_round)
    assert by_round[1] == by_round[0][::-1] and by_round[2] == by_round[0]


def test_interleaved_needs_two_rounds(tiny_model):
    out = CliRunner().invoke(main, ["--model", str(tiny_model("olmoe")), "--interleaved", "1"])
    assert out.exit_code == 2 and "needs 2 rounds" in out.output
