"""The share of decode time the disk had an expert read in flight: the union of the reads' spans, clipped to the
steady decode steps, against hand-computed values."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from harness.run import _device_busy_share
from harness.runtime.generation import SequenceLog
from harness.runtime.spans import covered_s, union
from harness.runtime.timing import steady_windows
from harness.store.reader import IoRecord


def test_union_of_overlapping_and_touching_spans():
    spans = [(7.0, 9.0), (0.0, 2.0), (1.0, 3.0), (3.0, 4.0), (5.0, 6.0)]
    assert union(spans) == [(0.0, 4.0), (5.0, 6.0), (7.0, 9.0)]
    assert union([]) == []


def test_covered_time_is_clipped_to_the_windows():
    # Reads in flight over [0, 4], [5, 6] and [7, 9]; steps [0.5, 1.5], [3.5, 5.5] and [8, 10].
    spans = [(0.0, 2.0), (1.0, 4.0), (5.0, 6.0), (7.0, 9.0)]
    windows = [(8.0, 10.0), (0.5, 1.5), (3.5, 5.5)]
    # 1.0 in the first step; 0.5 (3.5-4) + 0.5 (5-5.5) in the second; 1.0 (8-9) in the third.
    assert covered_s(spans, windows) == pytest.approx(3.0)
    assert covered_s(spans, [(4.0, 5.0), (6.0, 7.0)]) == 0.0  # the disk idle through both steps
    assert covered_s([], windows) == 0.0
    # One long read across three steps counts in each, once.
    assert covered_s([(0.0, 10.0), (2.0, 3.0)], windows) == pytest.approx(1.0 + 2.0 + 2.0)


def test_steady_windows_skip_each_sequences_warmup_steps():
    first = SequenceLog(prompt_tokens=3, step_s=[0.5, 0.25, 0.25], step_start_s=[10.0, 10.5, 10.75])
    second = SequenceLog(prompt_tokens=3, step_s=[1.0, 0.5], step_start_s=[20.0, 21.0])
    assert steady_windows([first, second], 1) == [(10.5, 10.75), (10.75, 11.0), (21.0, 21.5)]


def test_the_busy_share_counts_device_reads_only():
    second = 1_000_000_000
    disk = IoRecord((0, 1), 100, 1 * second, 2 * second)
    page_cache = IoRecord((0, 2), 100, 2 * second, 3 * second, page_cache_bytes=100)  # served whole by the cache
    part = IoRecord((0, 3), 100, 3 * second, 3 * second + second // 2, page_cache_bytes=40)
    window = [(0.0, 4.0)]
    # 1 s of the disk read and 0.5 s of the partly cached one, over a 4 s step; the page cache's read is no disk time.
    assert _device_busy_share(object(), [disk, page_cache, part], window) == pytest.approx(1.5 / 4)
    assert _device_busy_share(object(), [page_cache], window) is None  # nothing reached the device
    mapped = SimpleNamespace(device_bytes_by_phase={"prefill": 0, "decode": 0})  # reads through a mapped file
    assert _device_busy_share(mapped, [disk], window) is None
