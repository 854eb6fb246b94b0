"""Where a pack came from, and what a run computes with: the config fields that shape the weights (recorded
when packing, compared before a run) and the content hashes of a packed model.

`pack_content_hashes` is cheap: the expert and non-expert hashes come from the index (computed from the
bytes when packing, and every expert read is checked against them); only the small files (tokenizer,
config.json) are hashed when asked. Light module: no torch, no transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import xxhash

from harness.errors import HarnessError
from harness.models.locate import pack_paths
from harness.store.layout import PackIndex

SHAPING_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
    "num_experts_per_tok",
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "n_shared_experts",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "first_k_dense_replace",
    "decoder_sparse_step",
    "mlp_only_layers",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "tie_word_embeddings",
    # The expert count and width, under each architecture's own name.
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_num_experts",
    "expert_intermediate_size",
)
"""config.json fields that decide the shapes of the weights (absent ones are recorded as None)."""
TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template*",
)
_CHUNK_BYTES = 16 << 20


def source_fingerprint(files: list[Path]) -> dict[str, list[int]]:
    """Checkpoint file name -> [size, mtime_ns], as a pack records it: a re-pack is due when it changes."""
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def shaping_config(config: Any) -> dict[str, object]:
    """The fields of `config` (a transformers config) that shape the weights, JSON-normalised."""
    return json.loads(json.dumps({name: getattr(config, name, None) for name in SHAPING_FIELDS}, default=str))


def check_config_unchanged(model_dir: Path, packed: dict[str, object], current: dict[str, object]) -> None:
    """One-line HarnessError when config.json no longer says what it said when the pack was made."""
    changed = [f"{k} {current.get(k)!r} (packed with {v!r})" for k, v in packed.items() if current.get(k) != v]
    if changed:
        raise HarnessError(
            f"{Path(model_dir) / 'config.json'} changed after packing: {', '.join(changed)}; the weights no longer "
            "match it: restore it, or re-pack with `harness model pack --force`"
        )


def file_digest(path: Path) -> str:
    """xxh3-128 of a file's bytes (read in chunks), 32 hex digits."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as source:
        while chunk := source.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_digest(model_dir: Path) -> str:
    """xxh3-128 over the names and bytes of the tokenizer files in `model_dir` (empty when it has none)."""
    digest = xxhash.xxh3_128()
    files = sorted({p for pattern in TOKENIZER_FILES for p in Path(model_dir).glob(pattern) if p.is_file()})
    for path in files:
        digest.update(f"{path.name}:{file_digest(path)}\n".encode())
    return digest.hexdigest()


def pack_content_hashes(model_dir: Path) -> dict[str, str]:
    """Content identity of the packed model in `model_dir`, for run ids: `experts` (all expert bytes, from
    the index's per-expert checksums), `dense` (the non-expert weights file), `tokenizer` and `config`
    (config.json's bytes). Needs the pack (`harness model pack`); hashes only the small files."""
    index = PackIndex.load(pack_paths(model_dir)["index"])
    return {
        "experts": index.experts_digest(),
        "dense": index.dense_xxh3,
        "tokenizer": tokenizer_digest(model_dir),
        "config": file_digest(Path(model_dir) / "config.json"),
    }
