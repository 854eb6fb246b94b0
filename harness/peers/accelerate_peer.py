"""Peer `accelerate`: Hugging Face accelerate disk offload, the naive baseline of the offloading literature.

The transformers model is loaded with `device_map="auto"`, `max_memory={"cpu": ...}` and an
`offload_folder`: modules that do not fit the CPU allowance are written to the folder as memory-mapped
files and their weights are brought in on every forward pass (no expert cache, no prediction).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from harness.errors import HarnessError
from harness.peers.common import decode_loop, peer_result, workload
from harness.results import Validity
from harness.spec import RunSpec
from harness.telemetry.phase_io import PhaseReadBytes

RUNTIME_RESERVE_BYTES = 512 << 20
"""Budget share kept for the interpreter, activations and accelerate's own buffers (bytes), a documented
default; what is left of the RAM budget is accelerate's `max_memory["cpu"]`."""


def run(spec: RunSpec, model_dir: Path, run_dir: Path, argument: str | None, phases: PhaseReadBytes) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.runtime.generation import kv_cache_keyword  # imports transformers

    if argument:
        raise HarnessError("strategy 'accelerate' takes no argument")
    budget = spec.ram_budget_bytes
    rss = psutil.Process().memory_info().rss
    cpu_bytes = None if budget is None else budget - rss - RUNTIME_RESERVE_BYTES
    if cpu_bytes is not None and cpu_bytes <= 0:
        raise HarnessError(f"RAM budget {spec.ram_budget} leaves nothing for accelerate's max_memory")
    prompts, mode = workload(spec, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    validity = Validity()
    with tempfile.TemporaryDirectory(prefix="offload-", dir=run_dir) as offload:
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            local_files_only=True,
            dtype=torch.bfloat16,
            experts_implementation="eager",
            device_map="auto",
            max_memory={"cpu": cpu_bytes} if cpu_bytes is not None else None,
            offload_folder=offload,
        ).eval()
        load_s = time.perf_counter() - start
        placement = getattr(model, "hf_device_map", {})
        on_disk = sorted({name for name, where in placement.items() if where == "disk"})
        cache: dict[str, Any] = {}
        kv = kv_cache_keyword(model.forward)

        @torch.inference_mode()
        def step(ids: list[int], first: bool) -> int:
            from transformers import DynamicCache

            if first:
                cache["kv"] = DynamicCache(config=model.config)
            out = model(input_ids=torch.tensor([ids]), **{kv: cache["kv"]}, use_cache=True)
            return int(out.logits[0, -1].argmax())

        seqs = []
        for item in prompts:
            ids = tokenizer.encode(item.prompt)
            ref = tokenizer.encode(item.reference) if item.reference else None
            seqs.append(decode_loop(step, ids, spec.max_new_tokens, mode, ref, phases))
    section = {
        "name": "accelerate",
        "exact": True,
        "parameters": {"max_memory_cpu_bytes": cpu_bytes, "runtime_reserve_bytes": RUNTIME_RESERVE_BYTES},
        "deviations": [
            "the offload folder is written afresh in the run folder at load time (not measured), so its pages "
            "may start in the page cache; reclaim under the cgroup budget then sends reads to the SSD",
        ],
        "stats": {"modules_on_disk": len(on_disk), "device_map": placement},
        "notes": ["hit rate: null (accelerate keeps no expert cache; offloaded modules are reloaded every pass)"],
    }
    resolved = {"offloaded_modules": len(on_disk), "accelerate_max_memory_cpu_bytes": cpu_bytes}
    return peer_result(spec, model_dir, "accelerate", seqs, phases, section, resolved, validity, load_s, mode)
