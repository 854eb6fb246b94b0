"""The key heap (`harness.cache.heaps`) against a scan of every key, and LFU on it against LFU's definition."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from harness.cache.book import ExpertCacheBook
from harness.cache.heaps import HEAP_SIZE, heap_globals, heap_put, heap_remove, heap_rerank, lowest_unmarked, sortable
from harness.cache.policies.lfu import LFU
from harness.cache.queues import NONE

PLACE = 0


def test_the_heap_gives_the_lowest_unmarked_key_a_scan_gives():
    rng = random.Random(3)
    keys, room = 40, 24
    g = np.array(heap_globals(room), dtype=np.int64)
    ki = np.full((keys, 1), NONE, dtype=np.int64)
    rank: dict[int, tuple[int, int]] = {}
    for stamp in range(3000):
        key = rng.randrange(keys)
        if key in rank and rng.random() < 0.3:
            heap_remove(g, ki, 0, key, PLACE)
            del rank[key]
        elif key in rank:
            rank[key] = (rank[key][0] + rng.choice([-1, 0, 1, 2]), stamp)  # up or down
            heap_rerank(g, ki, 0, key, PLACE, *rank[key], 0)
        elif len(rank) < room:
            rank[key] = (rng.randrange(6), stamp)
            assert heap_put(g, ki, 0, key, PLACE, *rank[key], 0)
        assert g[HEAP_SIZE] == len(rank)
        marked = set(rng.sample(sorted(rank), min(len(rank), rng.randrange(6)))) if rank else set()
        mark = np.array([1 if k in marked else 0 for k in range(keys)], dtype=np.int64)
        unmarked = [k for k in rank if k not in marked]
        expected = min(unmarked, key=rank.__getitem__) if unmarked else NONE
        assert lowest_unmarked(g, 0, mark, 1) == expected, stamp
    assert all(ki[k, PLACE] == NONE for k in range(keys) if k not in rank)


def test_sortable_orders_floats_as_their_values():
    values = [-math.inf, -1e300, -2.0, -1.0, -1e-300, -0.0, 0.0, 5e-324, 1e-300, 1.0, 2.0, 1e300, math.inf]
    codes = [sortable(v) for v in values]
    for a, ca in zip(values, codes, strict=True):
        for b, cb in zip(values, codes, strict=True):
            assert (ca < cb) == (a < b) and (ca == cb) == (a == b), (a, b)


def _scan_lfu(steps: list[list[int]], capacity: int) -> list[int]:
    """Hits per step of LFU as defined: lifetime counts (misses count), ties to the least recently touched
    (a hit or an insert; hits of a step before its misses, each in expert order), a step's own keys exempt."""
    count: dict[int, int] = {}
    stamp: dict[int, int] = {}
    resident: set[int] = set()
    clock, hits = 0, []
    for experts in steps:
        needed = sorted(set(experts))
        for e in needed:
            count[e] = count.get(e, 0) + 1
            if e in resident:
                stamp[e], clock = clock, clock + 1
        misses = [e for e in needed if e not in resident]
        for e in misses:
            if len(resident) == capacity:
                resident.remove(min(resident - set(needed), key=lambda k: (count[k], stamp[k])))
            resident.add(e)
            stamp[e], clock = clock, clock + 1
        hits.append(len(needed) - len(misses))
    return hits


@pytest.mark.parametrize("capacity", [4, 24])
def test_lfu_on_its_heap_hits_as_its_definition_scanned(capacity):
    rng = random.Random(capacity)
    steps = [[rng.choice(range(0, 48, 1 + (t % 3))) for _ in range(4)] for t in range(600)]
    expected = _scan_lfu(steps, capacity)
    book = ExpertCacheBook([0], capacity, "per-layer", LFU)
    hits = [len(book.step(0, experts, t).hits) for t, experts in enumerate(steps)]
    assert hits == expected
    assert sum(hits) > 100  # reused experts, with evictions chosen between them (48 experts)
