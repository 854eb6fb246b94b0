"""Offloaded greedy generation yields exactly the tokens of the fully resident transformers model, for every
supported architecture, for checkpoints not made by the factory, and for int8 / int4 expert packs."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import generic as transformers_generic

from harness.errors import HarnessError
from harness.models.adapters import check_model_type
from harness.models.archs import REFUSED, SUPPORTED
from harness.models.factory import ARCHITECTURES
from harness.models.loader import reference_model
from harness.models.packer import pack_model, pack_paths
from harness.runtime.engine import OffloadEngine
from harness.runtime.generation import generate, kv_cache_keyword
from harness.store.layout import PackIndex
from tests.conftest import ARCHS

PROMPT = [5, 17, 99, 3, 250, 7, 8, 100, 42, 11]
NEW_TOKENS = 12


def offloaded_tokens(model_dir, slots: int, scope: str = "per-layer", policy: str = "lru") -> tuple[list[int], object]:
    paths = pack_paths(model_dir)
    index = PackIndex.load(paths["index"])
    engine = OffloadEngine(model_dir, index, paths["experts"], paths["dense"])
    cache = engine.configure_cache(slots, scope, policy, seed=0, io_threads=2)
    try:
        log = generate(engine.model, PROMPT, NEW_TOKENS, "greedy", ctx=engine.ctx)
    finally:
        engine.close()
    return log.token_ids, cache


def assert_matches_resident(model_dir, what: str) -> None:
    """Greedy tokens at the minimum cache (top-k slots per layer: the prefill streams experts) and at 50%."""
    index = PackIndex.load(pack_paths(model_dir)["index"])
    reference = generate(reference_model(model_dir, index), PROMPT, NEW_TOKENS, "greedy").token_ids
    for slots in sorted({index.top_k, index.num_experts // 2}):
        tokens, cache = offloaded_tokens(model_dir, slots)
        assert tokens == reference, f"{what} with {slots} slots per layer"
        assert cache.book.total().misses > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_offloaded_greedy_matches_resident_model(arch, tiny_model):
    assert_matches_resident(tiny_model(arch), arch)


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss"])
def test_global_scope_matches_resident_model(arch, tiny_model):
    model_dir = tiny_model(arch)
    index = PackIndex.load(pack_paths(model_dir)["index"])
    reference = generate(reference_model(model_dir), PROMPT, NEW_TOKENS, "greedy").token_ids
    tokens, _ = offloaded_tokens(model_dir, index.top_k * len(index.moe_layers), scope="global", policy="lfu")
    assert tokens == reference


def test_checkpoint_saved_by_transformers_itself(tmp_path):
    """A checkpoint built by transformers alone (no factory): MoE every 2nd layer, a dense first layer, shared
    experts, written by save_pretrained."""
    config = AutoConfig.for_model(
        "qwen2_moe",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=6,
        num_experts_per_tok=2,
        decoder_sparse_step=2,
        mlp_only_layers=[0],
        tie_word_embeddings=True,
    )
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    index, wrote = pack_model(tmp_path)
    assert wrote and index.moe_layers == [1] and index.num_experts == 6
    assert_matches_resident(tmp_path, "qwen2_moe from save_pretrained")


@pytest.mark.parametrize(
    ("arch", "dtype", "bits"), [("olmoe", "int8", 8.5), ("olmoe", "int4", 4.5), ("gpt_oss", "int4", None)]
)
def test_quantized_experts_match_quantized_resident_model(arch, dtype, bits, tiny_model, tmp_path):
    import shutil

    model_dir = tmp_path / arch
    shutil.copytree(tiny_model(arch), model_dir)
    full = PackIndex.load(pack_paths(model_dir)["index"])
    index, wrote = pack_model(model_dir, expert_dtype=dtype, group_size=32)
    assert wrote and index.expert_dtype == dtype and index.group_size == 32
    if bits is not None:  # no biases: the weights and one float16 scale per 32 of them
        assert index.bits_per_weight == bits
    assert index.expert_bytes < full.expert_bytes
    assert pack_model(model_dir)[1] is False  # the quantized pack is up to date as it is
    assert_matches_resident(model_dir, f"{arch} {dtype}")


def test_factory_offers_exactly_the_supported_architectures():
    assert set(ARCHITECTURES) == set(SUPPORTED)
    assert not set(REFUSED) & set(SUPPORTED)


def test_unsupported_architecture_is_refused_with_a_reason():
    for model_type, reason in REFUSED.items():
        with pytest.raises(HarnessError, match=re.escape(reason[:40])):
            check_model_type(model_type)
    with pytest.raises(HarnessError, match="not a supported Mixture-of-Experts"):
        check_model_type("llama")


def test_reference_loop_matches_transformers_generate(tiny_model, monkeypatch):
    model = reference_model(tiny_model("olmoe"))
    # The loop passes and reads the KV cache by the name this transformers takes: no deprecation warning (a
    # FutureWarning for the argument, a once-per-process log line for the output's attribute).
    logged: list[str] = []
    monkeypatch.setattr(transformers_generic.logger, "warning_once", lambda msg, *a, **k: logged.append(str(msg)))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values", category=FutureWarning)
        ours = generate(model, PROMPT, NEW_TOKENS, "greedy").token_ids
    assert not [m for m in logged if "past_key_values" in m]
    theirs = model.generate(
        torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=model.config.pad_token_id
    )[0, len(PROMPT) :].tolist()
    assert ours == theirs


def test_the_kv_cache_keyword_follows_the_forwards_signature():
    def renamed(input_ids=None, cache=None, use_cache=None): ...

    def older(input_ids=None, past_key_values=None, use_cache=None): ...

    assert kv_cache_keyword(renamed) == "cache" and kv_cache_keyword(older) == "past_key_values"


@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_offloaded_logits_are_bit_identical(arch, tiny_model):
    model_dir = tiny_model(arch)
    paths = pack_paths(model_dir)
    index = PackIndex.load(paths["index"])
    engine = OffloadEngine(model_dir, index, paths["experts"], paths["dense"])
    engine.configure_cache(index.top_k, "per-layer", "lru", seed=0, io_threads=2)
    with torch.inference_mode():
        ours = engine.model(torch.tensor([PROMPT])).logits
        theirs = reference_model(model_dir)(torch.tensor([PROMPT])).logits
    engine.close()
    assert torch.equal(ours, theirs)
