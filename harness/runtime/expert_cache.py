"""The expert cache mechanism: preallocated slots, parallel SSD reads, and the byte and wait accounting.

Who stays is decided by the shared `ExpertCacheBook` (and its policy); this module only moves bytes
into the slots the book names and hands out tensor views of them. Misses that get no slot (a step
that needs more experts than the cache holds) stream through a few scratch slots. The reads go through
a read backend (harness.runtime.expert_io: io_uring, or threads): a step's loads are submitted together;
prefetches (keys the book staged ahead of use) are background reads, so they overlap the demand reads and
the compute; a prefetch made just before a step may wait for that step's demand loads to start first, one
dropped while still queued is withdrawn, and one a step needs while still queued moves ahead. A slot is
never written while an earlier read into it is still in flight.
"""

from __future__ import annotations

import copy
import mmap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from harness.cache.book import ExpertCacheBook, StepPlan
from harness.keys import PHASES, ExpertKey, Phase
from harness.runtime.expert_io import PendingRead, ReadBackend
from harness.runtime.offloaded import ExpertWeights
from harness.store.layout import PackIndex
from harness.store.reader import AlignedPool, IoRecord


def slot_views(buffer: memoryview | mmap.mmap | torch.Tensor, index: PackIndex, count: int) -> list[ExpertWeights]:
    """Tensor views (no copies) of `count` consecutive blobs of `buffer` (host memory, or a uint8 tensor on any
    device), each laid out as in the pack: e.g. gate_up_proj [2I, H], down_proj [H, I] (and the scales of a
    quantized pack)."""
    dtypes = {t.name: getattr(torch, t.dtype or index.dtype) for t in index.tensors}
    whole = buffer if isinstance(buffer, torch.Tensor) else torch.frombuffer(buffer, dtype=torch.uint8)
    return [
        {
            t.name: whole[base + t.offset : base + t.offset + t.nbytes].view(dtypes[t.name]).view(t.shape)
            for t in index.tensors
        }
        for base in range(0, count * index.stride_bytes, index.stride_bytes)
    ]


@dataclass
class PrefetchStats:
    """What the prefetches did: counts of keys, bytes, and the read time they took off the critical path."""

    requested: int = 0
    """Predicted keys asked for (a prediction's keys, summed over predictions)."""
    already_resident: int = 0
    issued: int = 0
    """Reads started by prefetches."""
    issued_bytes: int = 0
    not_admitted: int = 0
    """Predicted keys that found no slot (every candidate protected)."""
    used: int = 0
    """Prefetched keys that a demand step then needed (counted as hits)."""
    wasted: int = 0
    wasted_bytes: int = 0
    """Prefetched keys dropped or evicted before any step used them, and their bytes."""
    cancelled: int = 0
    """Prefetches dropped or evicted while still queued: withdrawn before any byte was read (not wasted)."""
    hidden_s: float = 0.0
    """Read time of used prefetches that the demand step did not wait for, seconds."""
    exposed_s: float = 0.0
    """Time demand steps waited for a used prefetch still in flight, seconds."""

    def to_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


@dataclass
class _Inflight:
    read: PendingRead
    phase: Phase


@dataclass
class IoStats:
    records: list[IoRecord] = field(default_factory=list)
    bytes_by_phase: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    wait_ns_by_phase: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))


class ExpertCache:
    def __init__(self, index: PackIndex, io: ReadBackend, book: ExpertCacheBook, scratch_slots: int) -> None:
        self.index, self.io, self.book = index, io, book
        self.scratch_slots = max(scratch_slots, 1)
        self.pool = AlignedPool(book.total_slots + self.scratch_slots, index.stride_bytes)
        self.views = slot_views(self.pool.view, index, self.pool.slots)
        self._inflight: dict[int, _Inflight] = {}
        """slot -> the prefetch read writing it (accounted when settled, always on the caller's thread)."""
        self._prefetched: dict[ExpertKey, int] = {}
        """Keys read by a prefetch and not yet used by a step."""
        self._deferred: dict[ExpertKey, tuple[int, Phase]] = {}
        """Prefetches staged to start after the next step's demand loads: key -> (slot, phase)."""
        self.stats = IoStats()
        self.prefetch_stats = PrefetchStats()

    @property
    def slot_bytes(self) -> int:
        return self.book.total_slots * self.index.stride_bytes

    def _submit(self, loads: list[tuple[ExpertKey, int]], background: bool) -> list[PendingRead]:
        return self.io.submit([(key, self.pool.slot(slot)) for key, slot in loads], background)

    def _wait(self, reads: list[PendingRead], phase: Phase) -> Iterator[tuple[PendingRead, int]]:
        """`reads` as they complete, each with the nanoseconds waited for it."""
        start = time.perf_counter_ns()
        for read in self.io.as_completed(reads):
            waited_ns = time.perf_counter_ns() - start
            self.stats.wait_ns_by_phase[phase] += waited_ns
            yield read, waited_ns
            start = time.perf_counter_ns()

    def _account(self, record: IoRecord, phase: Phase) -> None:
        self.stats.records.append(record)
        self.stats.bytes_by_phase[phase] += record.device_bytes  # what the page cache served is no SSD read

    def _settle(self, slot: int) -> IoRecord | None:
        """Wait for the read in flight into `slot`, if any, and account it; its record, else None."""
        flight = self._inflight.pop(slot, None)
        if flight is None:
            return None
        start = time.perf_counter_ns()
        record = self.io.result(flight.read)
        self.stats.wait_ns_by_phase[flight.phase] += time.perf_counter_ns() - start
        self._account(record, flight.phase)
        return record

    def _forget_prefetched(self, keys: list[ExpertKey]) -> None:
        # Keys the book dropped or evicted before a step used them: a read still queued is withdrawn (its
        # slot is free at once and the disk is spared); one started was read for nothing.
        for key in keys:
            slot = self._prefetched.pop(key, None)
            if slot is None:
                continue
            flight = self._inflight.get(slot)
            if self._deferred.pop(key, None) is not None or (flight is not None and self.io.cancel(flight.read)):
                del self._inflight[slot]
                self.prefetch_stats.cancelled += 1
                continue
            self.prefetch_stats.wasted += 1
            self.prefetch_stats.wasted_bytes += self.index.stride_bytes

    def prefetch(
        self,
        layer: int,
        experts: list[int],
        now: int,
        phase: Phase,
        protect: tuple[ExpertKey, ...] = (),
        defer: bool = False,
    ) -> None:
        """Start reading `experts` of `layer` into slots the book stages for them; returns at once. With
        `defer` (a prediction made just before a step), the reads start right after that step's demand loads,
        which would otherwise queue behind them on the device."""
        plan = self.book.prefetch(layer, experts, now, protect)
        stats = self.prefetch_stats
        stats.requested += len(set(experts))
        stats.already_resident += len(plan.hits)
        stats.not_admitted += len(set(experts)) - len(plan.hits) - len(plan.loads)
        self._forget_prefetched(plan.evicted)
        for key, slot in plan.loads:
            self._settle(slot)
            self._prefetched[key] = slot
            self._deferred[key] = (slot, phase)
            stats.issued += 1
            stats.issued_bytes += self.index.stride_bytes
        if not defer:
            self._start_deferred()

    def _start_deferred(self) -> None:
        """Submit the staged prefetches not yet started, as background reads."""
        if not self._deferred:
            return
        loads = [(key, slot) for key, (slot, _) in self._deferred.items()]
        for read, (key, slot) in zip(self._submit(loads, background=True), loads, strict=True):
            self._inflight[slot] = _Inflight(read, self._deferred[key][1])
        self._deferred.clear()

    def discard_layer(self, layer: int, now: int) -> None:
        """Drop every resident and staged key of `layer` (a strategy without a cache)."""
        for key in [k for k in self.book.resident_keys() | self.book.staged_keys() if k[0] == layer]:
            self.book.discard(key, now)
            self._forget_prefetched([key])

    def snapshot(self) -> object:
        return copy.deepcopy((self.book.counts, self.stats))

    def restore(self, saved: object) -> None:
        self.book.counts, self.stats = saved  # type: ignore[misc]

    def ready(self, layer: int, experts: list[int]) -> bool:
        """Whether every one of `experts` is in a slot (resident, or prefetched) whose read, if any, has landed: a
        step of them waits for no read (at most for the checks of the last ones) and streams nothing."""
        for expert in experts:
            key = (layer, expert)
            slot = self.book.slot_of(key)
            if slot is None:
                slot = self._prefetched.get(key)
                if slot is None or key in self._deferred:
                    return False
            flight = self._inflight.get(slot)
            if flight is not None and not self.io.landed(flight.read):
                return False
        return True

    def fetch(self, layer: int, experts: list[int], now: int, phase: Phase) -> Iterator[tuple[int, ExpertWeights]]:
        """Yield (expert, weights) for every needed expert: resident hits at once, then loads and prefetches
        still in flight as their reads complete (the layer sums its experts in its own order afterwards).

        The caller must finish with a yielded expert before asking for the next one: streamed experts
        reuse scratch slots.
        """
        yield from self.serve(self.book.step(layer, experts, now, phase), phase)

    def serve(self, plan: StepPlan, phase: Phase) -> Iterator[tuple[int, ExpertWeights]]:
        """`fetch` for a plan already made by this cache's book (a tier stack steps the books of all its tiers)."""
        self._forget_prefetched(plan.dropped + plan.evicted)
        for _, slot in plan.loads:
            self._settle(slot)
        reads = self._submit(plan.loads, background=False)
        self._start_deferred()
        slot_of = {id(read): slot for read, (_, slot) in zip(reads, plan.loads, strict=True)}
        prefetches: dict[int, _Inflight] = {}
        """Used prefetches still to be accounted, by read: waited for beside the loads, not one by one."""
        for key, slot in plan.hits:
            if self._prefetched.pop(key, None) is not None:
                self.prefetch_stats.used += 1
                flight = self._inflight.pop(slot, None)
                if flight is not None:
                    prefetches[id(flight.read)] = flight
                    slot_of[id(flight.read)] = slot
                    continue
            yield key[1], self.views[slot]
        needed = [flight.read for flight in prefetches.values()]
        self.io.promote(needed)  # a queued prefetch a step needs is a demand read now
        for read, waited_ns in self._wait(reads + needed, phase):
            flight = prefetches.get(id(read))
            self._account(read.record, phase if flight is None else flight.phase)  # type: ignore[arg-type]
            if flight is not None:
                self._book_hidden(read.record, waited_ns)  # type: ignore[arg-type]
            yield read.key[1], self.views[slot_of[id(read)]]
        yield from self._stream(plan.streamed, phase)

    def _stream(self, keys: list[ExpertKey], phase: Phase) -> Iterator[tuple[int, ExpertWeights]]:
        """Read `keys` through the scratch slots, a slot's next read starting as soon as its expert is used
        (the caller is done with it when it asks for the next), so reads stay queued while experts compute."""
        queued = list(reversed(keys))
        free = list(range(self.book.total_slots + self.scratch_slots - 1, self.book.total_slots - 1, -1))
        inflight: list[PendingRead] = []
        slot_of: dict[int, int] = {}
        while queued or inflight:
            batch = [(queued.pop(), free.pop()) for _ in range(min(len(queued), len(free)))]
            if batch:
                for read, (_, slot) in zip(self._submit(batch, background=False), batch, strict=True):
                    inflight.append(read)
                    slot_of[id(read)] = slot
            read, _ = next(self._wait(inflight, phase))
            inflight.remove(read)
            self._account(read.record, phase)  # type: ignore[arg-type]
            slot = slot_of.pop(id(read))
            yield read.key[1], self.views[slot]
            free.append(slot)

    def _book_hidden(self, record: IoRecord, waited_ns: int) -> None:
        """A step used a prefetch after waiting `waited_ns` for it: the rest of its read time was hidden."""
        self.prefetch_stats.exposed_s += waited_ns / 1e9
        self.prefetch_stats.hidden_s += max(0, record.end_ns - record.start_ns - waited_ns) / 1e9

    def drain(self) -> None:
        """Wait for and account every read still in flight (the end of a run)."""
        self._start_deferred()
        for slot in list(self._inflight):
            self._settle(slot)
        self._forget_prefetched(list(self._prefetched))

    def close(self) -> None:
        self.drain()
