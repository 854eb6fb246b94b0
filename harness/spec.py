"""Run specifications: what one measurement is (pydantic, unknown keys refused) and its run_id."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.errors import HarnessError
from harness.units import parse_capacity, parse_size

if TYPE_CHECKING:
    from harness.cache.tiers import TierSpec


class RunSpec(BaseModel):
    """One cell: a model, a memory budget, a device for the expert file, a policy, a workload."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Model folder (config.json + safetensors) or a Hugging Face id in the local cache.")
    ram_budget: str | None = Field(
        None, description="Memory the inference process may use, page cache included (e.g. 2GiB)."
    )
    cache_experts: str | None = Field(
        None,
        description="Cache size instead of a budget: slots per layer (per-layer scope) or in all (global), "
        "as a count ('16') or a share of the experts ('25%').",
    )
    scope: Literal["per-layer", "global"] = Field("per-layer", description="Eviction group of the expert cache.")
    policy: str = Field("lru", description="Cache policy, e.g. lru, lfu, lfu-window:128, flashmoe:MODEL.")
    strategy: str = Field("cache", description="Runtime strategy: cache (policy only) or a named strategy.")
    ssd: str | None = Field(None, description="Folder on the SSD that holds (or receives) the packed expert file.")
    workload: str | None = Field("default", description="Prompt set in workloads/prompts (NAME or a .jsonl path).")
    prompt: str | None = Field(None, description="One prompt instead of a workload.")
    max_prompts: int | None = Field(None, ge=1, description="Use only the first N prompts of the workload.")
    max_new_tokens: int = Field(32, ge=1, description="Decode steps per prompt.")
    decode: Literal["greedy", "teacher-forced"] | None = Field(
        None, description="Decoding mode; default: teacher-forced for random-init models, greedy otherwise."
    )
    warmup_steps: int = Field(2, ge=0, description="Decode steps per prompt excluded from steady-state figures.")
    min_steady_s: float = Field(
        5.0,
        ge=0,
        description="Steady-state decode shorter than this (seconds) makes the run INVALID (MLPerf/optimum-benchmark "
        "minimum duration; 0 disables it, for smoke tests).",
    )
    io_engine: Literal["auto", "direct", "buffered"] = Field(
        "auto", description="Expert reads: O_DIRECT, or buffered with the file dropped from the page cache."
    )
    io_threads: int = Field(4, ge=1, le=64, description="Parallel expert reads (one layer's misses at once).")
    io_depth: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Expert reads in flight (the io_uring queue depth, or read threads); default: the knee of the "
        "random-read bandwidth at the expert size in the disk's SSD profile, else io_threads.",
    )
    decode_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="torch intra-op threads during decode steps (prefill keeps torch's default); default: torch's "
        "(all cores).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("cpu", description="Where non-expert weights and compute live.")
    vram_budget: str | None = Field(
        None,
        description="Device memory for non-expert weights, a reserve and the device tier's expert slots (e.g. 8GiB); "
        "needs a cuda device (harness.runtime.vram).",
    )
    telemetry_hz: float = Field(10.0, gt=0, le=1000, description="Telemetry sampling rate.")
    tiers: str | None = Field(
        None,
        description="Expert memory tiers top to bottom instead of one cache, e.g. device:lru:48,host:lfu:256 or "
        "host:lru:16,pagecache:512 (harness.cache.tiers; strategy cache only).",
    )
    seed: int = Field(0, description="Seed for anything random (random policy, sampling).")
    repeat: int = Field(0, ge=0, description="Repetition index; repeats get distinct run_ids.")

    @field_validator("ram_budget", "vram_budget")
    @classmethod
    def _budget_is_a_size(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_is_not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("the prompt is empty; give some text, or leave it out to use the workload")
        return value

    @field_validator("cache_experts")
    @classmethod
    def _cache_experts_is_a_count_or_share(cls, value: str | None) -> str | None:
        if value is not None:
            cache_experts_slots(value, 100)
        return value

    @field_validator("tiers")
    @classmethod
    def _tiers_parse(cls, value: str | None) -> str | None:
        if value is not None:
            from harness.cache.tiers import parse_tiers

            parse_tiers(value)
        return value

    @model_validator(mode="after")
    def _tiers_agree(self) -> RunSpec:
        if self.tiers is None:
            return self
        from harness.cache.tiers import parse_tiers

        if self.cache_experts is not None:
            raise HarnessError("tiers name each tier's capacity: drop cache_experts")
        if self.io_engine == "direct" and any(t.modelled for t in parse_tiers(self.tiers)):
            raise HarnessError("a page-cache tier needs buffered reads: io_engine direct bypasses the page cache")
        if self.strategy.partition(":")[0].strip().lower() != "cache":
            raise HarnessError(f"tiers run with strategy cache only (got {self.strategy!r}): drop one of the two")
        return self

    @property
    def ram_budget_bytes(self) -> int | None:
        return None if self.ram_budget is None else parse_size(self.ram_budget)

    @property
    def vram_budget_bytes(self) -> int | None:
        return None if self.vram_budget is None else parse_size(self.vram_budget)

    @property
    def bounds_expert_slots(self) -> bool:
        """Whether the expert slots are a memory bound (--cache-experts or --ram-budget), not a default."""
        return self.cache_experts is not None or self.ram_budget is not None

    def canonical(self) -> dict:
        """The spec as JSON, the run_id's input. A field added later is left out while unset (None), so the
        specs written before it keep their run ids."""
        data = self.model_dump(mode="json")
        for later in ("tiers", "vram_budget", "decode_threads", "io_depth"):
            if data[later] is None:
                del data[later]
        return data

    @property
    def run_id(self) -> str:
        """Content-addressed: this spec plus the checksums of the model, tokenizer and prompt file it names
        and the machine's fingerprint (harness.identity); stat-cached, so cheap to ask again."""
        from harness.identity import run_identity

        return run_identity(self).run_id


def cache_experts_slots(text: str, maximum: int) -> int:
    """Slots for a `cache_experts` value: a count ('16') or a share of `maximum` ('25%')."""
    return parse_capacity(text, maximum, "cache_experts")


def check_tiers(tiers: str, top_k: int, expert_file: str | Path) -> list[TierSpec]:
    """The plan-time checks of a spec's tiers, which need the model: each slot tier holds one step's top-k
    experts, and a page-cache tier's reads of `expert_file` can be classified (page cache or device)."""
    from harness.cache.tiers import check_tiers_fit, parse_tiers
    from harness.store.pagecache import classification_refused

    stack = parse_tiers(tiers)
    check_tiers_fit(stack, top_k)
    if any(t.modelled for t in stack):
        refused = classification_refused(expert_file)
        if refused is not None:
            raise HarnessError(f"a page-cache tier needs reads classified as page cache or device, but {refused}")
    return stack


def load_run_spec(data: dict) -> RunSpec:
    """Validate a mapping into a RunSpec with a one-line error naming the offending key."""
    try:
        return RunSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "spec"
        raise HarnessError(f"invalid run spec: {where}: {first['msg']}") from None
