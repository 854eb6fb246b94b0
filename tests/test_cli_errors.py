"""Bad input gets one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from harness.cli import main


def run_cli(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stderr.strip()


def assert_one_line_error(code: int, stderr: str, needle: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("error: ") and needle in stderr, stderr


def test_missing_model_folder(tmp_path):
    assert_one_line_error(
        *run_cli("run", "--model", str(tmp_path / "nope"), "--results", str(tmp_path)), "does not exist"
    )


def test_corrupt_checkpoint(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model("olmoe"), broken)
    shutil.rmtree(broken / "packed")
    (broken / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    assert_one_line_error(*run_cli("model", "pack", str(broken)), "corrupt")
    assert_one_line_error(*run_cli("run", "--model", str(broken), "--results", str(tmp_path)), "corrupt")


def test_model_without_moe_layers(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    assert_one_line_error(*run_cli("model", "pack", str(tmp_path / "llama")), "not a supported Mixture-of-Experts")


def test_budget_below_one_layer_of_experts(tiny_model, tmp_path):
    code, err = run_cli("run", "--model", str(tiny_model("olmoe")), "--ram-budget", "1MiB", "--results", str(tmp_path))
    assert_one_line_error(code, err, "RAM budget 1MiB is too small")
    assert "use at least" in err


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--policy", "nope", "unknown policy 'nope'"),
        ("--ssd", "/nonexistent/ssd", "SSD path /nonexistent/ssd does not exist"),
        ("--ram-budget", "lots", "cannot read size 'lots'"),
        ("--cache-experts", "many", "cannot read cache_experts 'many'"),
        ("--device", "cuda", "--device cuda: "),
    ],
)
def test_bad_run_options(tiny_model, tmp_path, flag, value, needle):
    assert_one_line_error(
        *run_cli("run", "--model", str(tiny_model("olmoe")), flag, value, "--results", str(tmp_path)), needle
    )


def test_unknown_architecture_on_create(tmp_path):
    assert_one_line_error(
        *run_cli("model", "create", "--arch", "gpt2", "--out", str(tmp_path / "m")),
        "model_type 'gpt2' is not a supported Mixture-of-Experts architecture",
    )
