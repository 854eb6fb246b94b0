"""One routing-statistics function: a run's result.json and `harness trace info` report the same figures."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.trace.schema import read_trace
from harness.trace.stats import layer_stats, routing_stats
from tests.test_simulate import write_trace


@pytest.fixture
def toy(tmp_path):
    # 8 experts, top-2, layers 0 and 1; step 0 is a prefill pass over two tokens (one step, experts united).
    rows = [
        (0, 0, 0, "prefill", [[0, 1], [4, 5]]),
        (0, 1, 0, "prefill", [[1, 2], [5, 6]]),
        (0, 2, 1, "decode", [[0, 3], [4, 4]]),
        (1, 0, 1, "decode", [[3, 2], [7, 4]]),
        (0, 3, 2, "decode", [[0, 1], [6, 7]]),
        (1, 1, 2, "decode", [[2, 1], [5, 6]]),
    ]
    return write_trace(tmp_path / "toy.parquet", rows)


def test_hand_computed_statistics(toy):
    # Steps of layer 0: {0,1,2} {0,2,3} {0,1,2}: counts 0:3 1:2 2:3 3:1, top 10% of 8 experts = 1 expert.
    # Steps of layer 1: {4,5,6} {4,7} {5,6,7}: every expert used twice.
    first, second = layer_stats(read_trace(toy))
    assert (first.steps, first.accesses, first.experts_used) == (3, 9, 4)
    assert first.top10_share == pytest.approx(3 / 9)
    assert first.consecutive_overlap == pytest.approx(1.0)  # {0,2} shared twice, of k=2
    assert (second.accesses, second.top10_share) == (8, pytest.approx(2 / 8))
    assert second.consecutive_overlap == pytest.approx(0.5)  # {4}, then {7}
    assert first.reuse_p50_steps == 1.0
    stats = routing_stats(read_trace(toy))
    assert stats["top10_share"] == pytest.approx((3 / 9 + 2 / 8) / 2)
    assert stats["consecutive_overlap"] == pytest.approx(0.75)
    assert stats["tokens"] == 6


def test_result_and_trace_info_agree(toy):
    stats = routing_stats(read_trace(toy))
    result = CliRunner().invoke(main, ["trace", "info", "--json", str(toy)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    for layer in info["per_layer"]:
        recorded = stats["per_layer"][str(layer["layer"])]  # type: ignore[index]
        assert layer["top10_share"] == recorded["top10_share"]
        assert layer["consecutive_overlap"] == recorded["consecutive_overlap"]


def test_json_output_is_strict_json():
    import numpy as np

    from harness.cli.output import _plain

    data = {"a": np.int64(3), "b": float("nan"), "c": (np.float32(0.5), float("inf")), "d": [np.bool_(True)]}
    assert json.loads(json.dumps(_plain(data), allow_nan=False)) == {"a": 3, "b": None, "c": [0.5, None], "d": [True]}
