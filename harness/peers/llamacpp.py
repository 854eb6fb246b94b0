"""Peer `llama.cpp`: the model converted to GGUF with the converter llama.cpp ships, run through
llama-cpp-python with its default memory map (beyond the RAM budget the OS page cache is its policy).

Optional: `pip install 'harness[peers]'` builds llama.cpp from source. The converter
(`convert_hf_to_gguf.py`) is not part of the wheel; point HARNESS_LLAMA_CONVERTER at it (it sits in the
llama-cpp-python sdist under vendor/llama.cpp/). Without either, the cell is skipped with the reason.
Argument: `llama.cpp:cpu-moe` asks for experts kept on the CPU (llama.cpp's --cpu-moe), which only
differs from the default where a GPU backend is built.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from harness.errors import HarnessError
from harness.models.locate import artifact_dir
from harness.peers.common import PeerUnavailable, decode_loop, peer_result, workload
from harness.results import Validity
from harness.spec import RunSpec
from harness.telemetry.phase_io import PhaseReadBytes

CONVERTER_ENV = "HARNESS_LLAMA_CONVERTER"
GGUF_OUTTYPE = "bf16"
"""The experts' own dtype: no quantisation, so bytes per expert match the offload engine's."""


def _gguf(model_dir: Path) -> Path:
    """The model as GGUF, converted once and kept beside the checkpoint (the harness cache for a model in
    the Hugging Face cache or a read-only folder)."""
    out = artifact_dir(model_dir, "gguf") / f"model-{GGUF_OUTTYPE}.gguf"
    if out.is_file():
        return out
    converter = os.environ.get(CONVERTER_ENV)
    if not converter or not Path(converter).is_file():
        raise PeerUnavailable(
            f"llama.cpp's convert_hf_to_gguf.py not found: set {CONVERTER_ENV} to it (llama-cpp-python sdist, "
            "vendor/llama.cpp/convert_hf_to_gguf.py)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    argv = [
        sys.executable,
        "-m",
        "harness.peers.gguf_convert",
        converter,
        str(model_dir),
        "--outfile",
        str(partial),
        "--outtype",
        GGUF_OUTTYPE,
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise HarnessError(f"GGUF conversion of {model_dir} failed: {last}")
    partial.replace(out)
    return out


def run(spec: RunSpec, model_dir: Path, run_dir: Path, argument: str | None, phases: PhaseReadBytes) -> dict[str, Any]:
    if argument not in (None, "cpu-moe"):
        raise HarnessError(f"strategy 'llama.cpp' takes no argument or 'cpu-moe' (got {argument!r})")
    try:
        import llama_cpp
    except ImportError:
        raise PeerUnavailable("llama-cpp-python is not installed (pip install 'harness[peers]')") from None
    from transformers import AutoTokenizer

    gguf = _gguf(model_dir)
    prompts, mode = workload(spec, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    encoded = [(tokenizer.encode(p.prompt), tokenizer.encode(p.reference) if p.reference else None) for p in prompts]
    n_ctx = max(len(ids) for ids, _ in encoded) + spec.max_new_tokens + 8
    # Drop the GGUF from the page cache so the first touches are SSD reads, as for the other cells.
    fd = os.open(gguf, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, use_mmap=True, n_threads=psutil.cpu_count(), verbose=False)
    load_s = time.perf_counter() - start

    def step(ids: list[int], first: bool) -> int:
        if first:
            llm.reset()
        llm.eval(ids)
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))

    seqs = [decode_loop(step, ids, spec.max_new_tokens, mode, ref, phases) for ids, ref in encoded]
    gpu = bool(getattr(llama_cpp, "llama_supports_gpu_offload", lambda: False)())
    deviations = [f"GGUF {GGUF_OUTTYPE} from llama.cpp's own converter; token ids from the checkpoint's tokenizer"]
    if argument == "cpu-moe" and not gpu:
        deviations.append("cpu-moe: this build has no GPU backend, so every tensor is on the CPU already")
    section = {
        "name": "llama.cpp",
        "exact": False,
        "parameters": {"gguf": str(gguf), "use_mmap": True, "cpu_moe": argument == "cpu-moe", "n_ctx": n_ctx},
        "deviations": deviations,
        "stats": {"llama_cpp_python": llama_cpp.__version__, "gpu_offload_supported": gpu},
        "notes": ["hit rate: null (llama.cpp keeps no expert cache; the page cache over its mmap is the policy)"],
    }
    resolved = {"gguf_bytes": gguf.stat().st_size}
    return peer_result(spec, model_dir, "llama.cpp", seqs, phases, section, resolved, Validity(), load_s, mode)
