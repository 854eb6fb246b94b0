"""The expert cache mechanism: preallocated slots, parallel SSD reads, and the byte and wait accounting.

Who stays is decided by the shared `ExpertCacheBook` (and its policy); this module only moves bytes
into the slots the book names and hands out tensor views of them. Misses that get no slot (a step
that needs more experts than the cache holds) stream through a few scratch slots.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import torch

from harness.cache.base import ExpertKey
from harness.cache.book import PHASES, ExpertCacheBook, Phase
from harness.store.layout import PackIndex
from harness.store.reader import AlignedPool, ExpertReader, IoRecord

ExpertWeights = dict[str, torch.Tensor]


@dataclass
class IoStats:
    records: list[IoRecord] = field(default_factory=list)
    bytes_by_phase: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    wait_ns_by_phase: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))


class ExpertCache:
    def __init__(self, index: PackIndex, reader: ExpertReader, book: ExpertCacheBook, io_threads: int) -> None:
        self.index, self.reader, self.book = index, reader, book
        self.scratch_slots = max(io_threads, 1)
        self.pool = AlignedPool(book.total_slots + self.scratch_slots, index.stride_bytes)
        dtype = getattr(torch, index.dtype)
        whole = torch.frombuffer(self.pool.view, dtype=torch.uint8)
        # Tensor views of every slot, made once: [gate_up_proj [2I, H], down_proj [H, I]].
        self.views: list[ExpertWeights] = []
        for slot in range(self.pool.slots):
            base = slot * index.stride_bytes
            self.views.append(
                {
                    t.name: whole[base + t.offset : base + t.offset + t.nbytes].view(dtype).view(t.shape)
                    for t in index.tensors
                }
            )
        self.executor = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="expert-io")
        self.stats = IoStats()

    @property
    def slot_bytes(self) -> int:
        return self.book.total_slots * self.index.stride_bytes

    def _read(self, key: ExpertKey, slot: int) -> IoRecord:
        return self.reader.read_into(key, self.pool.slot(slot))

    def _wait(self, futures: list[Future], phase: Phase) -> Iterator[Future]:
        start = time.perf_counter_ns()
        for future in as_completed(futures):
            self.stats.wait_ns_by_phase[phase] += time.perf_counter_ns() - start
            yield future
            start = time.perf_counter_ns()

    def _account(self, record: IoRecord, phase: Phase) -> None:
        self.stats.records.append(record)
        self.stats.bytes_by_phase[phase] += record.nbytes

    def fetch(self, layer: int, experts: list[int], now: int, phase: Phase) -> Iterator[tuple[int, ExpertWeights]]:
        """Yield (expert, weights) for every needed expert: hits at once, loads as their reads complete.

        The caller must finish with a yielded expert before asking for the next one: streamed experts
        reuse scratch slots.
        """
        plan = self.book.step(layer, experts, now, phase)
        pending = {self.executor.submit(self._read, key, slot): (key, slot) for key, slot in plan.loads}
        for (_, expert), slot in plan.hits:
            yield expert, self.views[slot]
        for future in self._wait(list(pending), phase):
            record = future.result()
            self._account(record, phase)
            key, slot = pending[future]
            yield key[1], self.views[slot]
        first_scratch = self.book.total_slots
        for start in range(0, len(plan.streamed), self.scratch_slots):
            chunk = plan.streamed[start : start + self.scratch_slots]
            futures = {
                self.executor.submit(self._read, key, first_scratch + i): (key, first_scratch + i)
                for i, key in enumerate(chunk)
            }
            for future in self._wait(list(futures), phase):
                self._account(future.result(), phase)
                key, slot = futures[future]
                yield key[1], self.views[slot]

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.reader.close()
