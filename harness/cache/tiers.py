"""A memory hierarchy for experts: tiers top to bottom, each an `ExpertCacheBook`, the SSD below the last.

A tier stack is written `device:lru:48,host:lfu:256,pagecache:4096` (`parse_tiers`): each tier is a kind,
a policy and a capacity. Slot tiers (`device`, `host`) hold `capacity` slots per eviction group, under
the run's scope, with a policy from the registry; the page-cache tier (`pagecache:N` or
`pagecache:kernel:N`) is the kernel's, which the simulator *models* as one LRU over N experts shared by all
layers (global scope), and says so (`TierSpec.modelled`): the real page cache works on pages, with an
active/inactive list pair and readahead, so the model is an approximation, measured against live runs
where the read path classifies each read (`harness.store.pagecache`).

Semantics (the documented choice):

- **Non-inclusive, non-exclusive** (NINE, as in CPU caches that are neither): each tier is an
  independent cache that sees as accesses only the misses of the tier above it. A device hit never
  reaches the host tier, so the host tier's policy does not see it (its LFU counts are counts of
  device misses). A miss at one tier is served by the next one down; the SSD serves what the last tier
  misses.
- **Promotion on a lower hit**: a device miss that hits the host tier is a hit for the host tier (its
  policy sees an access, as the bytes are read from that slot) and is copied into the device tier,
  which inserts it as any miss (evicting its policy's victim); the host keeps its copy. A miss in
  every tier is read from the SSD and filled into every tier on the way up (each inserts it).
- **Evictions stay local**: a victim at one tier is dropped, not written down to the next (no
  demotion), and evicting from a lower tier does not invalidate the copies above it (no
  back-invalidation). This is what the systems the harness compares do: the page cache keeps what
  was read through it, and a host slot copied to VRAM stays.

An exclusive variant (a key lives in one tier only: promotion moves it up, device victims are demoted
into the host tier) is not implemented: demotion needs an insert-with-eviction that does not count an
access, which `ExpertCacheBook` does not offer without touching its hot path.

With one tier the stack is the book itself (`account_stream` is the book's), so its counts are exactly
today's single-cache numbers. Bytes cross the edge below tier i once per miss at tier i.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from harness.cache.book import AccessCounts, ExpertCacheBook, StepPlan
from harness.cache.registry import policy_class, policy_factory
from harness.errors import HarnessError
from harness.keys import ExpertKey, Phase, Scope

TierKind = Literal["device", "host", "pagecache"]
TIER_KINDS: tuple[TierKind, ...] = ("device", "host", "pagecache")
"""In the only order they may be stacked, top to bottom; each kind at most once."""
KERNEL = "kernel"
"""The policy name of the page-cache tier: the kernel decides; the simulator models it as LRU."""
KERNEL_MODEL = "lru"
"""The registered policy that stands in for the kernel's page-cache replacement in replay."""
SSD = "ssd"
"""The name of the level below the last tier, in edge labels."""
SEMANTICS = "non-inclusive non-exclusive; a lower hit is copied up; no demotion (harness.cache.tiers)"
"""The stack's semantics in one line, for result files."""


@dataclass(frozen=True)
class TierSpec:
    """One tier: its kind, its policy spec (or `kernel`) and its capacity in slots.

    Capacity is slots per eviction group for slot tiers (per layer in per-layer scope, in all in global
    scope) and experts in all for the page cache (one group over every layer, as the kernel's cache is).
    """

    kind: TierKind
    policy: str
    capacity: int

    @property
    def modelled(self) -> bool:
        """True for the page cache: the simulator's numbers for it are an LRU model, not the kernel's."""
        return self.policy == KERNEL

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.policy}:{self.capacity}"


def parse_tiers(text: str) -> list[TierSpec]:
    """'device:lru:48,host:lfu:256,pagecache:4096' -> tier specs, top to bottom, with one-line errors.

    A slot tier is KIND:POLICY:SLOTS (the policy may carry its own argument, e.g. lfu-window:128); the page
    cache is pagecache:EXPERTS or pagecache:kernel:EXPERTS. Policies and their arguments are checked here.
    """
    tiers: list[TierSpec] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        fields = [f.strip() for f in part.split(":")]
        kind = fields[0].lower()
        if kind not in TIER_KINDS:
            raise HarnessError(f"unknown tier kind {fields[0]!r} in {part!r}: use {', '.join(TIER_KINDS)}")
        if kind == "pagecache":
            if len(fields) == 3 and fields[1].lower() == KERNEL:
                fields = [kind, fields[2]]
            if len(fields) != 2:
                raise HarnessError(
                    f"cannot read tier {part!r}: the kernel keeps the page cache; write pagecache:EXPERTS"
                )
            policy = KERNEL
        else:
            if len(fields) < 3 or not fields[1]:
                raise HarnessError(f"cannot read tier {part!r}: use {kind}:POLICY:SLOTS (e.g. {kind}:lru:48)")
            policy = ":".join(fields[1:-1])
            if policy.lower() == KERNEL:
                raise HarnessError(f"tier {part!r}: only the page cache is kept by the kernel; give {kind} a policy")
            if not policy_class(policy).needs_future:  # an oracle gets its future at replay
                policy_factory(policy)(1)  # a bad argument (lfu-window:x) fails now, with the registry's message
        tiers.append(TierSpec(kind, policy, _slots(fields[-1], part)))  # type: ignore[arg-type]
    if not tiers:
        raise HarnessError("no tier given: e.g. device:lru:48,host:lfu:256")
    kinds = [t.kind for t in tiers]
    if len(set(kinds)) != len(kinds) or kinds != sorted(kinds, key=TIER_KINDS.index):
        raise HarnessError(f"tiers {text!r}: each kind at most once, top to bottom ({' over '.join(TIER_KINDS)})")
    return tiers


def _slots(text: str, part: str) -> int:
    """A tier capacity: a whole number of slots, at least one."""
    try:
        slots = int(text)
    except ValueError:
        raise HarnessError(f"cannot read the capacity of tier {part!r}: give a number of slots") from None
    if slots < 1:
        raise HarnessError(f"tier {part!r} has no slot: a tier needs at least one")
    return slots


def check_tiers_fit(tiers: Sequence[TierSpec], top_k: int) -> None:
    """Refuse a slot tier smaller than one layer's top-k experts (a step must fit in each slot tier)."""
    for tier in tiers:
        if not tier.modelled and tier.capacity < top_k:
            raise HarnessError(
                f"tier {tier.label} holds {tier.capacity} slots, fewer than the model's top-{top_k} experts of one step"
            )


def tier_ram_bytes(tiers: Sequence[TierSpec], expert_bytes: int, num_layers: int, scope: Scope, device: str) -> int:
    """Host memory the stack's tiers hold when full: host slots, the page cache (inside the RAM budget, by the
    harness's convention), and device slots where the device is the CPU (a RAM pool standing in for VRAM)."""
    total = 0
    for tier in tiers:
        if tier.kind == "device" and device != "cpu":
            continue  # VRAM: checked against the VRAM budget, not the RAM budget
        groups = num_layers if scope == "per-layer" and not tier.modelled else 1
        total += tier.capacity * groups * expert_bytes
    return total


def check_tiers_budget(
    tiers: Sequence[TierSpec], expert_bytes: int, num_layers: int, scope: Scope, device: str, free_bytes: int
) -> None:
    """Refuse tiers that do not fit the RAM left for experts (`free_bytes`: the budget less the runtime)."""
    need = tier_ram_bytes(tiers, expert_bytes, num_layers, scope, device)
    if need > free_bytes:
        raise HarnessError(
            f"tiers {','.join(t.label for t in tiers)} hold {need / 2**20:.0f} MiB of experts in RAM, "
            f"but the RAM budget leaves {max(free_bytes, 0) / 2**20:.0f} MiB for them: use fewer slots"
        )


class TierStack:
    """Tiers top to bottom over the SSD, one `ExpertCacheBook` each (see the module docstring for semantics)."""

    def __init__(
        self,
        layers: Iterable[int],
        tiers: Sequence[TierSpec],
        scope: Scope = "per-layer",
        seed: int = 0,
        **context: object,
    ) -> None:
        self.layers = list(layers)
        self.tiers = list(tiers)
        if not self.tiers:
            raise HarnessError("a tier stack needs at least one tier")
        oracles = [t.label for t in self.tiers if not t.modelled and policy_class(t.policy).needs_future]
        if oracles and len(self.tiers) > 1:
            raise HarnessError(
                f"{', '.join(oracles)}: an oracle reads the future of its own accesses, which in a stack depend on "
                "the tiers above; use it as a single tier"
            )
        self.books = [
            ExpertCacheBook(
                self.layers,
                t.capacity,
                "global" if t.modelled else scope,
                policy_factory(KERNEL_MODEL if t.modelled else t.policy, seed, **context),
            )
            for t in self.tiers
        ]

    def step(self, layer: int, experts: Iterable[int], now: int, phase: Phase = "decode") -> list[StepPlan]:
        """Account one token step of one layer through the tiers; one plan per tier reached, top first.

        Tier i's plan lists what it hit (`hits`: served there) and what it missed (`loads` and `streamed`:
        served by tier i+1, or by the SSD after the last plan). A tier is reached only if the one above missed.
        """
        plans: list[StepPlan] = []
        wanted: Iterable[int] = experts
        for book in self.books:
            plan = book.step(layer, wanted, now, phase)
            plans.append(plan)
            missed = missed_keys(plan)
            if not missed:
                break
            wanted = [e for _, e in missed]
        return plans

    def account_stream(self, calls: Sequence[tuple[int, tuple[ExpertKey, ...], int, Phase]]) -> None:
        """Replay (layer, keys, now, phase) calls prepared by the simulator. One tier is the book's own
        `account_stream`, the single-cache simulator's path; a stack goes through `step`."""
        if len(self.books) == 1:
            self.books[0].account_stream(calls)
            return
        step = self.step
        for layer, keys, now, phase in calls:
            step(layer, [e for _, e in keys], now, phase)

    def counts(self, tier: int) -> dict[Phase, dict[int, AccessCounts]]:
        """Tier `tier`'s hits and misses per phase and layer (its accesses are the misses of the tier above)."""
        return self.books[tier].counts

    def total(self, tier: int, phase: Phase | None = None) -> AccessCounts:
        return self.books[tier].total(phase)

    def edges(self) -> list[str]:
        """Labels of the edges below each tier, top first: 'host->device', ..., 'ssd->host'."""
        below = [t.kind for t in self.tiers[1:]] + [SSD]
        return [f"{lower}->{t.kind}" for t, lower in zip(self.tiers, below, strict=True)]


def missed_keys(plan: StepPlan) -> list[ExpertKey]:
    """The keys a step plan did not find (loaded into a slot or streamed), sorted: the next tier's accesses."""
    return sorted([key for key, _ in plan.loads] + plan.streamed)
