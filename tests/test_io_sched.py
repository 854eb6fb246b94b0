"""The expert I/O threads' scheduler slice: asked for where the kernel takes it, with the thread's nice value kept;
the kernel's default and the reason everywhere else; named in every result's `expert_io`."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from harness.models.packer import pack_paths
from harness.runtime import io_sched
from harness.runtime.expert_io import ThreadReads, UringReads
from harness.runtime.io_sched import IO_THREAD_SLICE_S, request_short_slice, slice_unsupported
from harness.ssd import uring
from harness.store.layout import PackIndex
from harness.store.reader import AlignedPool, ExpertReader

SUPPORTED = slice_unsupported() is None
GRANTED = f"{IO_THREAD_SLICE_S * 1e3:g} ms (sched_setattr"


def _in_thread(work):
    out: list = []
    thread = threading.Thread(target=lambda: out.append(work()))
    thread.start()
    thread.join()
    return out[0]


def _own_slice_ns() -> int | None:
    """The calling thread's slice from /proc (kernels built with scheduler debugging), else None."""
    path = Path(f"/proc/self/task/{threading.get_native_id()}/sched")
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("se.slice"):
            return int(line.split(":")[1])
    return None


@pytest.mark.skipif(not SUPPORTED, reason=str(slice_unsupported()))
def test_the_calling_thread_gets_the_short_slice_and_keeps_its_nice_value():
    def work():
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 3)  # raising one's own nice needs no privilege
        got = request_short_slice()
        return got, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), _own_slice_ns()

    got, nice, slice_ns = _in_thread(work)
    assert got.startswith(GRANTED)
    assert nice == 3  # sched_setattr sets the nice value too: the thread's own is passed, not 0
    assert slice_ns in (None, round(IO_THREAD_SLICE_S * 1e9))
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 0  # only the calling thread changed


@pytest.mark.parametrize(
    ("attribute", "value", "why"),
    [
        ("release", lambda: "6.6.30-generic", "Linux 6.6.30-generic takes no per-thread slice (6.12+)"),
        ("machine", lambda: "riscv64", "no sched_setattr system call number known for riscv64"),
    ],
)
def test_elsewhere_the_thread_keeps_the_default_and_says_why(monkeypatch, attribute, value, why):
    monkeypatch.setattr(io_sched.platform, "system", lambda: "Linux")
    monkeypatch.setattr(io_sched.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(io_sched.platform, "release", lambda: "6.18.0")
    monkeypatch.setattr(io_sched.platform, attribute, value)
    assert slice_unsupported() == why
    assert _in_thread(request_short_slice) == f"kernel default ({why})"


@pytest.mark.parametrize("backend_class", [UringReads, ThreadReads])
def test_each_backend_names_its_threads_slice(backend_class, tiny_model):
    if backend_class is UringReads and uring.unavailable_reason():
        pytest.skip(str(uring.unavailable_reason()))
    paths = pack_paths(tiny_model("olmoe"))
    index = PackIndex.load(paths["index"])
    reader = ExpertReader(paths["experts"], index)
    backend = backend_class(reader, queue_depth=1)
    try:
        pool = AlignedPool(1, index.stride_bytes)
        (read,) = backend.submit([((index.moe_layers[0], 0), pool.slot(0))], background=False)
        backend.result(read)  # a thread has run by now, whichever backend
        expected = GRANTED if SUPPORTED else "kernel default ("
        assert backend.io_thread_slice.startswith(expected)
    finally:
        backend.close()
        reader.close()
