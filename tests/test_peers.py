"""Peer cells: a peer that cannot run here is skipped with its reason; accelerate writes the result shape."""

from __future__ import annotations

import importlib.util

import pytest

from harness.run import execute
from harness.spec import RunSpec


def spec_for(model_dir, strategy: str) -> RunSpec:
    return RunSpec(model=str(model_dir), strategy=strategy, prompt="a b c d e", decode="greedy", max_new_tokens=4)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None, reason="llama-cpp-python is installed")
def test_llama_cpp_without_package_is_skipped_with_reason(tiny_model, tmp_path):
    result = execute(spec_for(tiny_model("olmoe"), "llama.cpp"), tmp_path)
    assert result["status"] == "skipped"
    assert "llama-cpp-python is not installed" in result["error"]
    assert (tmp_path / result["run_id"] / "result.json").is_file()


def test_accelerate_peer_writes_the_result_shape(tiny_model, tmp_path):
    result = execute(spec_for(tiny_model("olmoe"), "accelerate"), tmp_path)
    assert result["status"] == "ok" and result["strategy"]["name"] == "accelerate"
    assert result["metrics"]["hit_rate_decode"] is None
    assert len(result["generated"][0]["token_ids"]) == 4
