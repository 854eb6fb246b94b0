"""Runs llama.cpp's own `convert_hf_to_gguf.py`, unchanged, on a checkpoint.

    python -m harness.peers.gguf_convert CONVERTER MODEL_DIR [converter options...]

The converter recognises a checkpoint's pre-tokenizer by hashing a sample encoding against the
vocabularies it knows. The tokenizer that the harness trains locally for its random-init models is
not among them, although its pre-tokenizer is GPT-2's byte-level split; for checkpoints made by the
harness factory only, the converter is told "gpt-2" instead of failing. Every other checkpoint goes
through the converter untouched.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

HARNESS_PRE_TOKENIZER = "gpt-2"
"""llama.cpp's name for the byte-level pre-tokenizer of `harness.models.tokenizer`."""


def _made_by_harness(model_dir: Path) -> bool:
    marker = model_dir / "harness_model.json"
    return marker.is_file() and bool(json.loads(marker.read_text()).get("random_init"))


def main(argv: list[str]) -> None:
    converter, model_dir, *options = argv
    sys.path.insert(0, str(Path(converter).resolve().parent))
    if _made_by_harness(Path(model_dir)):
        from conversion import base  # llama.cpp's converter package, beside the script

        base.TextModel.get_vocab_base_pre = lambda self, tokenizer: HARNESS_PRE_TOKENIZER
    sys.argv = [converter, model_dir, *options]
    runpy.run_path(converter, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
