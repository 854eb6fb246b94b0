"""Verified expert bytes: the one check every expert read goes through before its bytes are used.

The checksum is xxh3-64 (the `xxhash` package): tens of GB/s on one core, so checking every read
costs a small share of the read itself (`python -m harness.benchmarks.checksum_cost` measures it).
It is seeded with the blob's (layer, expert), so a blob read under another expert's entry fails even
when the whole entry (offset and checksum) was moved. Not a cryptographic hash: it guards against
corruption and mix-ups, not against someone forging a pack.
"""

from __future__ import annotations

from pathlib import Path

import xxhash

from harness.errors import HarnessError
from harness.store.layout import ExpertEntry, PackIndex

REPACK = "run `harness model pack` to re-pack it"
"""The remedy named by a failed check of a pack (a copy elsewhere names its own)."""


def expert_checksum(layer: int, expert: int, payload: bytes | memoryview) -> str:
    """xxh3-64 of one blob's payload seeded with its key, as 16 hex digits (the index's `xxh3`)."""
    # Through update(): xxhash releases the GIL there for large buffers, so I/O threads verify their
    # reads while the compute thread runs.
    digest = xxhash.xxh3_64(seed=(layer << 32) | expert)
    digest.update(payload)
    return digest.hexdigest()


def verify_expert(path: Path, index: PackIndex, entry: ExpertEntry, buffer: memoryview, remedy: str = REPACK) -> None:
    """Raise a one-line HarnessError unless `buffer` (one blob read from `path` at `entry.offset`, padding
    allowed after the payload) holds the bytes `entry` was packed with. Call it after every read."""
    got = expert_checksum(entry.layer, entry.expert, buffer[: index.expert_bytes])
    if got != entry.xxh3:
        raise HarnessError(
            f"{path}: layer {entry.layer} expert {entry.expert} at offset {entry.offset} fails its checksum "
            f"(xxh3 {got}, index {entry.xxh3}): the expert file is corrupt or not this index's; {remedy}"
        )


def check_extent(path: Path, index: PackIndex, size_bytes: int, remedy: str = REPACK) -> None:
    """Raise a one-line HarnessError naming the first entry that a file of `size_bytes` cannot serve
    (beyond its end, off the stride, or sharing its blob with another entry), or when the size is not the
    index's: a truncated or padded file, or an index edited by hand."""
    seen: dict[int, ExpertEntry] = {}
    for entry in sorted(index.entries, key=lambda e: e.offset):
        where = f"{path}: layer {entry.layer} expert {entry.expert} at offset {entry.offset}"
        if entry.offset + index.stride_bytes > size_bytes:
            raise HarnessError(
                f"{where} lies beyond the end of the file ({size_bytes} bytes): the expert file is truncated "
                f"or the index is not its own; {remedy}"
            )
        if entry.offset < 0 or entry.offset % index.stride_bytes:
            raise HarnessError(
                f"{where} is not at a multiple of the stride ({index.stride_bytes} bytes): the index is corrupt; "
                f"{remedy}"
            )
        other = seen.setdefault(entry.offset, entry)
        if other is not entry:
            raise HarnessError(
                f"{where} shares its blob with layer {other.layer} expert {other.expert}: the index is corrupt; "
                f"{remedy}"
            )
    expected = index.stride_bytes * len(index.entries)
    if size_bytes != expected:
        raise HarnessError(f"{path}: {size_bytes} bytes where its index describes {expected}; {remedy}")
