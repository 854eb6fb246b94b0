"""Benchmark: what verifying every expert read costs, per read and as a share of the read itself.

    python -m harness.benchmarks.checksum_cost --file F [--expert-size 3MiB] [--reads 200] [--rounds 3]

F is any file of at least one expert (a pack's experts.bin, or a scratch file on the SSD under test).
Each round reads `--reads` random, expert-aligned blocks of `--expert-size` with O_DIRECT (buffered
with the range dropped from the page cache where O_DIRECT is refused, as the harness's reader does)
into one aligned buffer, timing the read, then times the checksum the harness computes on every read
(`harness.store.checksum.expert_checksum`, xxh3-64) over the same bytes. Prints, per round, the read's
and the checksum's median time per expert (µs), the checksum's share of the read time and the
checksum's speed (GB/s), and the median over rounds. Other I/O and CPU load skew both; run it quiet.
"""

from __future__ import annotations

import errno
import os
import random
import statistics
import time
from pathlib import Path

import click

from harness.iomem import IoBuffer
from harness.store.checksum import expert_checksum
from harness.store.layout import ALIGN_BYTES, align_up
from harness.units import format_bytes, parse_size


def _open(path: Path) -> tuple[int, bool]:
    """A descriptor on `path` and whether it is O_DIRECT."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT), True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return os.open(path, os.O_RDONLY), False


def _round(fd: int, direct: bool, buffer: memoryview, expert_bytes: int, blocks: int, reads: int, seed: int):
    """(read seconds, checksum seconds) of each read of one round."""
    rng = random.Random(seed)
    read_s, hash_s = [], []
    for _ in range(reads):
        offset = rng.randrange(blocks) * len(buffer)
        if not direct:
            os.posix_fadvise(fd, offset, len(buffer), os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        got = os.preadv(fd, [buffer], offset)
        read_end = time.perf_counter()
        expert_checksum(0, 0, buffer[:expert_bytes])
        hash_end = time.perf_counter()
        if got != len(buffer):
            raise click.ClickException(f"short read at offset {offset}: {got} of {len(buffer)} bytes")
        read_s.append(read_end - start)
        hash_s.append(hash_end - read_end)
    return read_s, hash_s


@click.command()
@click.option("--file", "path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--expert-size", default="3MiB", show_default=True, help="Payload bytes of one expert.")
@click.option("--reads", default=200, show_default=True, help="Random expert reads per round.")
@click.option("--rounds", default=3, show_default=True)
def main(path: Path, expert_size: str, reads: int, rounds: int) -> None:
    expert_bytes = parse_size(expert_size)
    stride = align_up(expert_bytes, ALIGN_BYTES)
    blocks = path.stat().st_size // stride
    if blocks < 1:
        raise click.ClickException(f"{path} is smaller than one {expert_size} expert")
    fd, direct = _open(path)
    buffer = IoBuffer(stride)
    click.echo(
        f"{path}: {blocks} experts of {format_bytes(expert_bytes)} (stride {format_bytes(stride)}), "
        f"{'O_DIRECT' if direct else 'buffered, range dropped from the page cache before each read'}, "
        f"xxh3-64 checksum"
    )
    summary = []
    try:
        for round_ in range(rounds):
            read_s, hash_s = _round(fd, direct, buffer.view, expert_bytes, blocks, reads, seed=round_)
            read_us, hash_us = statistics.median(read_s) * 1e6, statistics.median(hash_s) * 1e6
            summary.append((read_us, hash_us))
            click.echo(
                f"round {round_ + 1}: read {read_us:9.1f} µs/expert, checksum {hash_us:7.1f} µs/expert "
                f"({100 * hash_us / read_us:5.2f}% of the read), checksum {expert_bytes / hash_us / 1e3:6.2f} GB/s"
            )
    finally:
        os.close(fd)
    read_us = statistics.median(r for r, _ in summary)
    hash_us = statistics.median(h for _, h in summary)
    click.echo(
        f"median of {rounds} rounds: read {read_us:.1f} µs, checksum {hash_us:.1f} µs per {format_bytes(expert_bytes)} "
        f"expert = {100 * hash_us / read_us:.2f}% of the read time; checksum {expert_bytes / hash_us / 1e3:.2f} GB/s, "
        f"read {expert_bytes / read_us / 1e3:.2f} GB/s"
    )


if __name__ == "__main__":
    main()
