"""The decode loop: prefill, then one token per forward pass, greedy or teacher-forced, timed per step.

The same loop drives the offloaded model and the fully resident reference, so a comparison of their
tokens tests the offloading and nothing else.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedModel

from harness.runtime.offloaded import StepContext

DecodeMode = Literal["greedy", "teacher-forced"]


@dataclass
class SequenceLog:
    prompt_tokens: int
    prefill_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    """Wall time of each decode forward pass, seconds."""
    step_start_s: list[float] = field(default_factory=list)
    """When each decode forward pass began (`time.perf_counter()`, the clock of the expert reads' records)."""
    token_ids: list[int] = field(default_factory=list)
    """The model's argmax prediction after prefill and after each decode step."""
    fed_ids: list[int] = field(default_factory=list)
    """Tokens fed to the decode steps (equal to token_ids[:-1] when greedy)."""


KV_CACHE_KEYWORDS = ("cache", "past_key_values")
"""The names a KV cache goes by in transformers: the current one and the one it replaced."""


def kv_cache_keyword(forward: Callable[..., object]) -> str:
    """The keyword `forward` (a transformers model's or decoder layer's) takes its KV cache by, and the name of the
    cache on its output: `cache` in the transformers releases that renamed it (they warn on the old name, which a
    later release removes), else `past_key_values`."""
    current, former = KV_CACHE_KEYWORDS
    return current if current in inspect.signature(forward).parameters else former


def _finish(device: torch.device) -> None:
    """A forward pass's time ends when its work is done: CUDA kernels run after the call returns."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    mode: DecodeMode,
    reference_ids: list[int] | None = None,
    ctx: StepContext | None = None,
    seq_id: int = 0,
    on_token: Callable[[int], None] | None = None,
    decode_threads: int | None = None,
) -> SequenceLog:
    """Prefill `prompt_ids`, then `max_new_tokens - 1` decode steps (the prefill yields the first token), the
    decode steps on `decode_threads` torch threads (None: as they are)."""
    ctx = ctx or StepContext()
    if mode == "teacher-forced":
        if not reference_ids:
            raise ValueError("teacher-forced decoding needs reference tokens")
        max_new_tokens = min(max_new_tokens, len(reference_ids) + 1)
    log = SequenceLog(prompt_tokens=len(prompt_ids))
    ctx.seq_id, ctx.phase, ctx.first_pos = seq_id, "prefill", 0
    kv = kv_cache_keyword(model.forward)
    start = time.perf_counter()
    # The model makes its own cache: hybrid architectures (linear attention, MiniMax) need their own type.
    output = model(input_ids=torch.tensor([prompt_ids], device=model.device), use_cache=True)
    logits, cache = output.logits, getattr(output, kv)
    _finish(model.device)
    log.prefill_s = time.perf_counter() - start
    ctx.now += 1
    token = int(logits[0, -1].argmax())
    log.token_ids.append(token)
    if on_token:
        on_token(token)
    position = len(prompt_ids)
    with torch_threads(decode_threads):
        for step in range(max_new_tokens - 1):
            feed = token if mode == "greedy" else reference_ids[step]  # type: ignore[index]
            ctx.phase, ctx.first_pos = "decode", position
            start = time.perf_counter()
            logits = model(input_ids=torch.tensor([[feed]], device=model.device), **{kv: cache}, use_cache=True).logits
            _finish(model.device)
            log.step_start_s.append(start)
            log.step_s.append(time.perf_counter() - start)
            ctx.now += 1
            position += 1
            token = int(logits[0, -1].argmax())
            log.fed_ids.append(feed)
            log.token_ids.append(token)
            if on_token:
                on_token(token)
    return log


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` (None: unchanged) inside, and put back after. A decode
    step's operators work on one row: each one's parallel region (start and join of the threads) may cost more
    than the extra cores gain, the more so where the I/O thread's checks share them; the floor benchmark's
    `--decode-threads` measures it."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
