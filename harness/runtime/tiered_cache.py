"""The live memory hierarchy of experts: one `TierStack` (harness.cache.tiers) deciding, pools moving the bytes.

The stack's books decide which tier serves each access, exactly as `harness simulate --tiers` replays it
(non-inclusive, non-exclusive; a lower hit is copied up; an SSD read fills every slot tier on the way up;
evictions stay local). This module only moves the bytes the books' plans name:

- the tier that reads the expert file is an `ExpertCache` (its slots, scratch slots and read backend) that
  serves the plan its book made inside the stack (`ExpertCache.serve`). That is the host slot tier; with no
  host slot tier it is a reader with scratch slots only, and every key it is asked for streams through them;
- a device tier above it is a `DevicePool`: its own slots, preallocated on the compute device (on the CPU a
  separate RAM pool standing in for VRAM), filled by copies of what the tier below hands up;
- a page-cache tier is the kernel's: the file is read buffered and each read classified as served by the page
  cache or by the device (`harness.store.pagecache.PageCacheReader`); the stack's book for that tier is the
  simulator's LRU model, run on the same accesses beside the live classification.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from typing import cast

import torch

from harness.cache.book import AccessCounts, ExpertCacheBook, StepPlan
from harness.cache.registry import policy_factory
from harness.cache.tiers import KERNEL_MODEL, TierSpec, TierStack, missed_keys
from harness.keys import PHASES, Phase, Scope
from harness.runtime.expert_cache import ExpertCache, IoStats, slot_views
from harness.runtime.expert_io import ReadBackend
from harness.runtime.offloaded import ExpertWeights
from harness.store.layout import PackIndex
from harness.store.reader import AlignedPool

log = logging.getLogger(__name__)

PhaseCounts = dict[Phase, dict[int, AccessCounts]]


class DevicePool:
    """The device tier's slots: `book.total_slots` slots and one scratch slot (for what the tier streams),
    preallocated on `device` and filled by copies from the tier below.

    On the CPU a copy is a plain tensor copy into a separate RAM pool. On CUDA (NOT RUN ON THIS MACHINE: no
    GPU was available where this was written; see the README's list of CUDA-only lines) copies go
    `non_blocking` on a dedicated stream; each slot has an event recorded after its fill, which the compute
    stream waits for before using the slot (compute waits only for the expert it needs), and an event
    recorded when compute was handed the slot, which a later fill of that slot waits for. The host waits for
    each copy before the tier below may reuse its source buffer (a scratch slot, or a host slot a later read
    refills); the host memory is pinned in place (`cudaHostRegister`) by `TieredExperts`.
    """

    def __init__(self, index: PackIndex, book: ExpertCacheBook, device: torch.device) -> None:
        self.book, self.device, self.stride = book, device, index.stride_bytes
        self.slots = book.total_slots + 1
        self.scratch = book.total_slots
        self.memory = torch.empty(self.slots * index.stride_bytes, dtype=torch.uint8, device=device)
        self.views = slot_views(self.memory, index, self.slots)
        self.cuda = device.type == "cuda"
        if self.cuda:  # CUDA-only, not run here
            self.stream = torch.cuda.Stream(device)
            self.filled = [torch.cuda.Event() for _ in range(self.slots)]
            self.released = [torch.cuda.Event() for _ in range(self.slots)]

    @property
    def slot_bytes(self) -> int:
        return self.book.total_slots * self.stride

    def _fill(self, slot: int, weights: ExpertWeights) -> None:
        target = self.views[slot]
        if not self.cuda:
            for name, tensor in weights.items():
                target[name].copy_(tensor)
            return
        # CUDA-only, not run here: the copy waits for the compute that last read the slot, runs on the copy
        # stream, and the host waits for it (the source buffer may be refilled by the next read).
        self.stream.wait_event(self.released[slot])
        with torch.cuda.stream(self.stream):
            for name, tensor in weights.items():
                target[name].copy_(tensor, non_blocking=True)
            self.filled[slot].record(self.stream)
        self.filled[slot].synchronize()

    def _hand_out(self, expert: int, slot: int) -> Iterator[tuple[int, ExpertWeights]]:
        if self.cuda:  # CUDA-only, not run here
            torch.cuda.current_stream(self.device).wait_event(self.filled[slot])
        yield expert, self.views[slot]
        if self.cuda:  # the caller has queued its compute on the slot: a later fill waits for it
            self.released[slot].record(torch.cuda.current_stream(self.device))

    def serve(
        self, plan: StepPlan, below: Iterator[tuple[int, ExpertWeights]], layer: int
    ) -> Iterator[tuple[int, ExpertWeights]]:
        """Hits from the device slots at once; each miss as the tier below hands it up, copied into the slot
        the plan names (or the scratch slot, where the device tier streams it)."""
        for key, slot in plan.hits:
            yield from self._hand_out(key[1], slot)
        slot_of = dict(plan.loads)
        for expert, weights in below:
            slot = slot_of.get((layer, expert), self.scratch)
            self._fill(slot, weights)
            yield from self._hand_out(expert, slot)


class TieredExperts:
    """An expert source over a tier stack: `fetch` steps the stack once and serves every expert from the
    highest tier holding it (see the module docstring). `io` reads the expert file: a `PageCacheReader`
    behind it where the stack has a page-cache tier."""

    def __init__(
        self,
        index: PackIndex,
        tiers: Sequence[TierSpec],
        scope: Scope,
        seed: int,
        io: ReadBackend,
        scratch_slots: int,
        device: str = "cpu",
    ) -> None:
        self.index, self.tiers, self.scope = index, list(tiers), scope
        self.stack = TierStack(index.moe_layers, self.tiers, scope, seed)
        kinds = [t.kind for t in self.tiers]
        self.host_at = kinds.index("host") if "host" in kinds else None
        self.pagecache_at = kinds.index("pagecache") if "pagecache" in kinds else None
        if self.host_at is not None:
            reader_book = self.stack.books[self.host_at]
        else:
            # No host slots: a reader whose every key streams through its scratch slots (the book's one slot
            # is never used: `serve` is only given streamed keys).
            reader_book = ExpertCacheBook(index.moe_layers, 1, "global", policy_factory(KERNEL_MODEL))
        self.lower = ExpertCache(index, io, reader_book, scratch_slots)
        self.device = DevicePool(index, self.stack.books[0], torch.device(device)) if kinds[0] == "device" else None
        self._pinned: int | None = None
        if self.device is not None and self.device.cuda:  # CUDA-only, not run here: pin the host pool in place
            self._pinned = torch.frombuffer(self.lower.pool.view, dtype=torch.uint8).data_ptr()
            torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(self._pinned, self.lower.pool.nbytes, 0))
        self.live: PhaseCounts = {p: {layer: AccessCounts() for layer in index.moe_layers} for p in PHASES}
        """The page-cache tier's accesses as the read classification saw them (hit: the page cache served all)."""

    @property
    def book(self) -> ExpertCacheBook:
        """The top tier's book (the result's policy and slot figures)."""
        return self.stack.books[0]

    @property
    def stats(self) -> IoStats:
        """Every read of the expert file (SSD bytes: what the device read, `IoRecord.device_bytes`)."""
        return self.lower.stats

    @property
    def pool(self) -> AlignedPool:
        return self.lower.pool

    @property
    def slot_bytes(self) -> int:
        """Expert slot memory of every slot tier (scratch slots excluded)."""
        host = self.lower.slot_bytes if self.host_at is not None else 0
        return host + (self.device.slot_bytes if self.device is not None else 0)

    def ready(self, layer: int, experts: list[int]) -> bool:
        """Never: the device tier streams what it does not hold through one scratch slot (the per-expert path)."""
        return False

    def fetch(self, layer: int, experts: list[int], now: int, phase: Phase) -> Iterator[tuple[int, ExpertWeights]]:
        """Yield (expert, weights) for every needed expert; the caller finishes with one before the next."""
        plans = self.stack.step(layer, experts, now, phase)
        first_read = len(self.lower.stats.records)
        if self.device is None:
            if self.host_at == 0:
                yield from self.lower.serve(plans[0], phase)
            else:  # page cache only: every access is a read
                yield from self.lower.serve(StepPlan(streamed=[(layer, e) for e in sorted(set(experts))]), phase)
        else:
            missed = missed_keys(plans[0])
            if not missed:
                below: Iterator[tuple[int, ExpertWeights]] = iter(())
            elif self.host_at is not None:
                below = self.lower.serve(plans[self.host_at], phase)
            else:
                below = self.lower.serve(StepPlan(streamed=missed), phase)
            yield from self.device.serve(plans[0], below, layer)
        if self.pagecache_at is not None:
            live = self.live[phase][layer]
            for record in self.lower.stats.records[first_read:]:
                if record.page_cache_bytes == record.nbytes:
                    live.hits += 1
                else:
                    live.misses += 1

    def served(self) -> PhaseCounts:
        """The hierarchy's counts per phase and layer: an access is a hit when some tier served it, a miss when
        the device (SSD) was read for it; with a page-cache tier, by the live classification."""
        top = self.stack.counts(0)
        bottom = self.live if self.pagecache_at is not None else self.stack.counts(len(self.tiers) - 1)
        return {
            p: {
                layer: AccessCounts(top[p][layer].accesses - bottom[p][layer].misses, bottom[p][layer].misses)
                for layer in self.index.moe_layers
            }
            for p in PHASES
        }

    def snapshot(self) -> object:
        return copy.deepcopy(([b.counts for b in self.stack.books], self.lower.stats, self.live))

    def restore(self, saved: object) -> None:
        counts, self.lower.stats, self.live = cast(tuple[list[PhaseCounts], IoStats, PhaseCounts], saved)
        for book, book_counts in zip(self.stack.books, counts, strict=True):
            book.counts = book_counts

    def close(self) -> None:
        self.lower.close()
        if self._pinned is not None:  # CUDA-only, not run here
            torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(self._pinned))
            self._pinned = None
