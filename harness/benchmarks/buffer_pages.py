"""Benchmark: direct reads into base-page vs huge-page buffers, in device requests per read and MB/s.

    python -m harness.benchmarks.buffer_pages --file F [--block-size 1MiB] [--reads 400] [--rounds 3]

Reads random blocks of an existing file with O_DIRECT at queue depth 1 (io_uring where it works,
else preadv), alternating a buffer of 4 KiB pages (a plain private anonymous map, never
madvised) and an `IoBuffer` (2 MiB-aligned, transparent huge pages requested). The device's own
request counter (/proc/diskstats through psutil) says how many requests each read became: more
than one where the buffer's pages needed more segments than the device takes (see harness.iomem).
Other I/O to the same disk meanwhile is counted too; run it on a quiet disk.
"""

from __future__ import annotations

import mmap
import os
import random
import time
from pathlib import Path

import click
import psutil

from harness.iomem import IoBuffer, address_of, thp_mode
from harness.ssd import uring
from harness.ssd.devices import block_device_for_path
from harness.units import parse_size


@click.command()
@click.option("--file", "path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--block-size", default="1MiB", show_default=True)
@click.option("--reads", default=400, show_default=True, help="Reads per buffer kind and round.")
@click.option("--rounds", default=3, show_default=True)
def main(path: Path, block_size: str, reads: int, rounds: int) -> None:
    bs = parse_size(block_size)
    blocks = path.stat().st_size // bs
    disk = block_device_for_path(path)
    if disk is None or blocks < 1:
        raise click.ClickException(f"{path} is on no block device, or smaller than one {block_size} block")
    base = mmap.mmap(-1, bs, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base[:] = bytes(bs)  # resident, like the IoBuffer
    huge = IoBuffer(bs)
    buffers = {"base pages": address_of(base), "huge pages": huge.address}
    ring = uring.Ring(1) if uring.unavailable_reason() is None else None
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    click.echo(
        f"{path} on {disk}, {block_size} reads, transparent huge pages: {thp_mode()}, "
        f"huge-page share of the IoBuffer: {huge.huge_page_share:.0%}, "
        f"{'io_uring' if ring else 'preadv'}"
    )
    rng = random.Random(0)
    try:
        for round_ in range(rounds):
            for kind, address in buffers.items():
                before = psutil.disk_io_counters(perdisk=True)[disk].read_count
                started = time.perf_counter()
                for _ in range(reads):
                    offset = rng.randrange(blocks) * bs
                    if ring is not None:
                        ring.prepare(uring.OP_READ, fd, address, bs, offset, 0)
                        ring.submit(wait=1)
                        ((_, done),) = ring.reap()
                    else:
                        view = base if kind == "base pages" else huge.view
                        done = os.preadv(fd, [view], offset)
                    if done != bs:
                        raise click.ClickException(f"short read at {offset}: {done}")
                elapsed = time.perf_counter() - started
                requests = psutil.disk_io_counters(perdisk=True)[disk].read_count - before
                click.echo(
                    f"round {round_} {kind:>10}: {reads * bs / elapsed / 1e6:7.0f} MB/s, "
                    f"{requests / reads:.2f} device requests per read"
                )
    finally:
        os.close(fd)
        if ring is not None:
            ring.close()
        huge.close()
        base.close()


if __name__ == "__main__":
    main()
