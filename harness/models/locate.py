"""Where a model and its pack live: a folder or a Hugging Face id in the local cache, and the folder
its pack is written to.

Where packs go (the harness never writes into a folder it does not own):

- A writable model folder of the user's (one `harness model create` made, or a checkpoint the user
  copied) keeps its pack beside the weights, in `<model>/packed/`, as before.
- A model in the Hugging Face cache (`.../models--ORG--NAME/snapshots/COMMIT/`) and a read-only model
  folder get their pack in the harness cache: `$HARNESS_CACHE/packed/models--ORG--NAME/COMMIT/` and
  `$HARNESS_CACHE/packed/NAME-PATHHASH/` (`HARNESS_CACHE` defaults to `$XDG_CACHE_HOME/harness`, else
  `~/.cache/harness`). Writing into `snapshots/COMMIT/` would make huggingface_hub count the pack as
  part of the model, and a shared cache is often read-only. Other derived files (the llama.cpp
  peer's GGUF) follow the same rule (`artifact_dir`).
- A read-only folder that already holds a pack beside it (packed before it was made read-only) keeps
  using that pack.

Light module: no torch, no transformers.
"""

from __future__ import annotations

import os
from pathlib import Path

import xxhash

from harness.errors import HarnessError
from harness.paths import harness_cache_dir
from harness.store.layout import DENSE_FILE, EXPERTS_FILE, INDEX_FILE, PACK_DIR

HF_MODEL_PREFIX = "models--"


def resolve_model_dir(model: str) -> Path:
    """A model folder, or the snapshot folder of a Hugging Face id found in the local cache (the cache
    `HF_HUB_CACHE` names, else huggingface_hub's default); nothing is downloaded."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if model.count("/") == 1 and not model.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            # HF_HUB_CACHE read now, not when huggingface_hub was first imported.
            cache_dir = os.environ.get("HF_HUB_CACHE")
            return Path(snapshot_download(model, local_files_only=True, cache_dir=cache_dir))
        except Exception:  # any failure means: not in the local cache
            raise HarnessError(
                f"model {model!r} is neither a folder nor in the local Hugging Face cache "
                "(nothing is downloaded at run time)"
            ) from None
    raise HarnessError(f"model folder {model} does not exist")


def hf_snapshot(model_dir: Path) -> tuple[str, str] | None:
    """(Hugging Face id, commit) when `model_dir` is a snapshot folder of the Hugging Face cache, else None."""
    path = Path(model_dir).absolute()
    repo = path.parent.parent
    if path.parent.name == "snapshots" and repo.name.startswith(HF_MODEL_PREFIX):
        return repo.name.removeprefix(HF_MODEL_PREFIX).replace("--", "/"), path.name
    return None


def model_name(model_dir: Path) -> str:
    """The model's name in results: its Hugging Face id (`allenai/OLMoE-1B-7B-0924`) for a cached model,
    else the folder's name."""
    snapshot = hf_snapshot(model_dir)
    return snapshot[0] if snapshot else Path(model_dir).name


def artifact_dir(model_dir: Path, name: str) -> Path:
    """The folder of what the harness derives from `model_dir` (`name`: "packed" for the pack, "gguf" for
    the llama.cpp peer's conversion): `model_dir/name` or `$HARNESS_CACHE/name/...` (module docstring)."""
    model_dir = Path(model_dir)
    snapshot = hf_snapshot(model_dir)
    if snapshot is not None:
        model_id, commit = snapshot
        return harness_cache_dir() / name / (HF_MODEL_PREFIX + model_id.replace("/", "--")) / commit
    beside = model_dir / name
    if os.access(model_dir, os.W_OK) or beside.is_dir():
        return beside
    where = xxhash.xxh3_64_hexdigest(str(model_dir.resolve()).encode())
    return harness_cache_dir() / name / f"{model_dir.resolve().name}-{where}"


def pack_dir(model_dir: Path) -> Path:
    """The folder that holds (or will hold) the pack of `model_dir`."""
    return artifact_dir(model_dir, PACK_DIR)


def pack_paths(model_dir: Path) -> dict[str, Path]:
    """The pack's folder (`dir`) and its files: `experts`, `index`, `dense`."""
    out = pack_dir(model_dir)
    return {"dir": out, "experts": out / EXPERTS_FILE, "index": out / INDEX_FILE, "dense": out / DENSE_FILE}
