"""Time spans (start, end), in seconds on one clock: their union, and how much of some windows they cover. The
device timeline's copy/compute overlap and the disk's busy share of decode time are both these two figures."""

from __future__ import annotations


def union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of `spans`, as disjoint spans in time order."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def covered_s(spans: list[tuple[float, float]], windows: list[tuple[float, float]]) -> float:
    """Seconds of `windows` (disjoint) during which at least one of `spans` was open: one pass over both in time
    order."""
    merged, windows = union(spans), sorted(windows)
    total, i = 0.0, 0
    for w_start, w_end in windows:
        while i < len(merged) and merged[i][1] <= w_start:
            i += 1  # spans that end before this window end before every later one too
        j = i
        while j < len(merged) and merged[j][0] < w_end:
            total += min(merged[j][1], w_end) - max(merged[j][0], w_start)
            j += 1
    return total
