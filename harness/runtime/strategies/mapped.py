"""The two-tier expert memory of Fiddler- and DAOP-style strategies: a static set of experts pinned in
preallocated RAM slots, and every other expert read through a memory map of the packed expert file.

Under the cgroup RAM budget the OS page cache is the second tier's cache: a mapped expert's pages come
from the SSD on first touch or after reclaim. Tensors over the map are views (no copies). Bytes read
from the SSD for mapped access are this process's device reads (/proc/self/io), sampled at every
prefill/decode boundary, never inferred from accesses. Pinned slots are filled with O_DIRECT reads,
counted like the expert cache's.

Verified bytes: pinned reads are checked like every reader read; a mapped expert is checked on its
first touch in the run (the checksum reads it whole, as the compute would), once per run: pages the
kernel drops and reads again later are not checked again.
"""

from __future__ import annotations

import copy
import logging
import mmap
import os
from collections.abc import Iterator, Set
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from harness.cache.base import CachePolicy
from harness.cache.book import ExpertCacheBook
from harness.errors import HarnessError
from harness.keys import PHASES, ExpertKey, Phase, Scope
from harness.runtime.expert_cache import IoStats, slot_views
from harness.runtime.offloaded import ExpertWeights
from harness.runtime.strategies.base import Strategy
from harness.store.checksum import verify_expert
from harness.store.layout import PackIndex
from harness.store.reader import AlignedPool, ExpertReader
from harness.telemetry.phase_io import PhaseReadBytes

if TYPE_CHECKING:
    from harness.runtime.engine import OffloadEngine

log = logging.getLogger(__name__)


class StaticPlacement(CachePolicy):
    """The pinned tier's policy: residents are placed by the strategy; a miss is never admitted."""

    name = "static"
    observes_misses = False

    def on_access(self, key: ExpertKey, now: int, hit: bool) -> None:
        """Placement does not depend on accesses."""

    def admit(self, incoming: ExpertKey, candidates: Set[ExpertKey], now: int) -> bool:
        return False

    def victim(self, candidates: Set[ExpertKey], incoming: ExpertKey, now: int) -> ExpertKey:
        raise AssertionError("static placement never evicts on a miss")


class MappedExperts:
    """An expert source: pinned slots (hits) first, else a view of the memory-mapped expert file."""

    def __init__(
        self,
        index: PackIndex,
        reader: ExpertReader,
        experts_file: Path,
        book: ExpertCacheBook,
        device: torch.device | None = None,
    ) -> None:
        self.index, self.reader, self.book = index, reader, book
        self.pool = AlignedPool(book.total_slots, index.stride_bytes)
        self.views = slot_views(self.pool.view, index, self.pool.slots)
        self.device = device or torch.device("cpu")
        """Where the pinned set computes: a GPU holds a copy of each pinned expert (the fast tier in VRAM)."""
        self._device_views: dict[int, ExpertWeights] = {}
        self.stats = IoStats()
        fd = os.open(experts_file, os.O_RDONLY)
        try:
            # Start from an empty page cache for this file (pages cached by earlier cells would be hits
            # that cost this run nothing), then map it privately: reads share the page cache, no copies.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)
        # No read-around: a fault would otherwise read the device's read-ahead window (often MiBs of
        # neighbouring experts); each needed expert is asked for whole with MADV_WILLNEED instead.
        self._map.madvise(mmap.MADV_RANDOM)
        self._mapped = slot_views(self._map, index, len(index.entries))
        self._bytes = memoryview(self._map)
        self._verified: set[ExpertKey] = set()
        self.experts_file = Path(experts_file)
        self._position = {(e.layer, e.expert): e.offset // index.stride_bytes for e in index.entries}
        self.mapped_accesses = dict.fromkeys(PHASES, 0)
        # Device reads through the map, per phase; the pinned tier's own O_DIRECT reads are excluded
        # (they are counted as records, like the plain cache's).
        self.device_reads = PhaseReadBytes()

    @property
    def slot_bytes(self) -> int:
        return self.book.total_slots * self.index.stride_bytes

    def mapped(self, key: ExpertKey) -> ExpertWeights:
        """Views of `key` in the mapped file; asks the kernel to read the whole expert now, and verifies
        it on its first touch."""
        entry = self.index.entry(*key)
        self._map.madvise(mmap.MADV_WILLNEED, entry.offset, self.index.stride_bytes)
        if key not in self._verified:
            end = entry.offset + self.index.stride_bytes
            verify_expert(self.experts_file, self.index, entry, self._bytes[entry.offset : end], self.reader.remedy)
            self._verified.add(key)
        return self._mapped[self._position[key]]

    def pin(self, key: ExpertKey, now: int, phase: Phase) -> bool:
        """Place `key` in a free slot and read it there (O_DIRECT); False when no slot is free."""
        slot = self.book.place(key, now)
        if slot is None:
            return False
        record = self.reader.read_into(key, self.pool.slot(slot))
        if self.device.type != "cpu":
            self._device_views[slot] = {name: t.to(self.device) for name, t in self.views[slot].items()}
        self.device_reads.exclude(record.nbytes)
        self.stats.records.append(record)
        self.stats.bytes_by_phase[phase] += record.nbytes
        return True

    def unpin(self, key: ExpertKey, now: int) -> None:
        self.book.discard(key, now)

    def is_pinned(self, key: ExpertKey) -> bool:
        return self.book.slot_of(key) is not None

    @property
    def device_bytes_by_phase(self) -> dict[str, int]:
        return self.device_reads.by_phase

    def snapshot(self) -> object:
        # The device reads and map accesses of each phase are measured too, beside the book's and pin reads.
        return copy.deepcopy((self.book.counts, self.stats, self.device_reads, self.mapped_accesses))

    def restore(self, saved: object) -> None:
        self.book.counts, self.stats, self.device_reads, self.mapped_accesses = saved  # type: ignore[misc]

    def tier_stats(self) -> dict[str, object]:
        """What the two tiers did: experts pinned, accesses served through the map and their device reads."""
        return {
            "pinned_experts": len(self.book.resident_keys()),
            "mapped_accesses": dict(self.mapped_accesses),
            "mapped_device_read_bytes_by_phase": dict(self.device_bytes_by_phase),
        }

    def ready(self, layer: int, experts: list[int]) -> bool:
        """Always: pinned slots and the map are read where the compute touches them, and no view is reused."""
        return True

    def fetch(self, layer: int, experts: list[int], now: int, phase: Phase) -> Iterator[tuple[int, ExpertWeights]]:
        self.device_reads.mark(phase)
        plan = self.book.step(layer, experts, now, phase)
        for (_, expert), slot in plan.hits:
            yield expert, self._device_views.get(slot, self.views[slot])
        # The pinned tier admits nothing on demand: a miss that found a free slot gives it back at once.
        for key, _ in plan.loads:
            self.book.discard(key, now)
        for key in [key for key, _ in plan.loads] + plan.streamed:
            self.mapped_accesses[phase] += 1
            yield key[1], self.mapped(key)

    def finish(self) -> None:
        """Close the last phase's device-read interval (the end of the measured run)."""
        self.device_reads.mark(None)

    def close(self) -> None:
        self._mapped.clear()
        self._bytes.release()
        # The map closes when the last tensor view of it is gone; closing it now would fail while the
        # model's autograd-free graph may still hold a view.


def popularity_from_trace(path: str, index: PackIndex) -> dict[ExpertKey, int]:
    """Accesses per (layer, expert) in a recorded routing trace (all phases, one per token and layer)."""
    from harness.errors import HarnessError
    from harness.trace.schema import read_trace

    trace = read_trace(path)
    if trace.meta.moe_layers != index.moe_layers or trace.meta.num_experts != index.num_experts:
        raise HarnessError(
            f"trace {path} routes {trace.meta.num_experts} experts in layers {trace.meta.moe_layers}, the model "
            f"{index.num_experts} in {index.moe_layers}: record the profile on the same model"
        )
    counts: dict[ExpertKey, int] = {}
    for seq in trace.sequences:
        for column, layer in enumerate(index.moe_layers):
            ids, freq = np.unique(seq.experts[:, column, :], return_counts=True)
            for expert, n in zip(ids.tolist(), freq.tolist(), strict=True):
                counts[(layer, expert)] = counts.get((layer, expert), 0) + n
    return counts


def most_popular(counts: dict[ExpertKey, int], keys: list[ExpertKey], n: int) -> list[ExpertKey]:
    """The `n` most accessed of `keys` (ties: lower layer, then lower expert id)."""
    return sorted(keys, key=lambda k: (-counts.get(k, 0), k))[:n]


class TwoTierStrategy(Strategy):
    """What Fiddler- and DAOP-style share: a share (`pin`) of the cache's slots pinned in RAM over the
    memory-mapped expert file, reduced to the CPU here; subclasses place the pinned set."""

    source: MappedExperts
    profile: str
    """Where the popularity that places the pinned set comes from."""

    def _two_tiers(self, engine: OffloadEngine, slots: int, scope: Scope) -> MappedExperts:
        share = float(self.params["pin"])  # type: ignore[arg-type]
        if not 0 < share <= 1:
            raise HarnessError(f"{self.name} pin share must be in (0, 1] (got {share})")
        book = ExpertCacheBook(engine.index.moe_layers, max(1, round(share * slots)), scope, StaticPlacement)
        self.source = MappedExperts(engine.index, engine.reader, engine.experts_file, book, engine.device)
        return self.source

    def finish(self) -> None:
        self.source.finish()

    def stats(self) -> dict[str, object]:
        reduction = "cpu-only reduction" if self.source.device.type == "cpu" else "real devices: GPU and CPU"
        return {
            "reduction": reduction,
            "compute_device": str(self.source.device),
            "popularity_profile": self.profile,
            **self.source.tier_stats(),
        }
