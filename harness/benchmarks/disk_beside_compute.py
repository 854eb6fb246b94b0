"""Benchmark: how fast the disk reads while the model computes, against alone, and the bound that sets on
decode_floor_ratio.

    python -m harness.benchmarks.disk_beside_compute --model models/olmoe-small [--ssd DIR] [--io-depth 1] \\
        [--rounds 4] [--read-seconds 5] [--decode-threads N]

The floor divides a run's time by the disk's profiled bandwidth, measured on an idle machine. Where the disk itself
reads slower while the CPUs compute (a VM's virtual disk, whose host copies each read into guest memory, can), no
schedule of reads reaches that floor: a disk-bound run whose disk is never idle still sits at 1 / (rate beside
compute / rate alone). This measures that ratio: random expert-sized reads of the model's expert file (fio with
io_uring and --direct=1 where both work, else the profiler's own loop, named in the output), alone and beside a
process decoding greedily with the whole model resident (it reads nothing: its weights are loaded before the first
measurement), in `--rounds` pairs whose order alternates. The decoding process is started once and stopped
(SIGSTOP) while the disk reads alone, so every pair sees the same loaded model. It prints each pair with the
decode's step time beside the reads, the median ratio and the bound. Run it on a quiet machine.
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

import click

from harness.models.locate import model_name
from harness.models.packer import pack_paths
from harness.ssd.engine import resolve_backend, run_job
from harness.ssd.fio import fio_command, fio_path, run_fio
from harness.ssd.jobs import JobSpec
from harness.store.layout import PackIndex
from harness.store.placement import place_expert_file

READY = "ready"
"""The decoding process's first line: the model is loaded and has decoded once."""
PROMPT_TOKENS = 24
STEPS_PER_LINE = 16
"""Decode steps per sequence of the decoding process; it prints each sequence's median step (ms)."""


def decode_forever(model_dir: Path, decode_threads: int | None) -> None:
    """The decoding process: the resident model decoding greedy sequences until killed, one line per sequence."""
    from harness.models.loader import into_process_memory, reference_model
    from harness.runtime.generation import generate

    model = into_process_memory(reference_model(model_dir))  # not mapped from the checkpoint: it must read nothing
    prompt = [(5 + i) % model.config.get_text_config().vocab_size for i in range(PROMPT_TOKENS)]
    generate(model, prompt, 2, "greedy", decode_threads=decode_threads)  # first-call costs
    print(READY, flush=True)
    while True:
        log = generate(model, prompt, STEPS_PER_LINE + 1, "greedy", decode_threads=decode_threads)
        print(f"{1e3 * statistics.median(log.step_s):.3f}", flush=True)


class DecodeBeside:
    """The decoding process, started once and held stopped (SIGSTOP) but while `hold(compute=True)`. Its step times
    are collected with the time each arrived, so a measurement window takes the ones it saw."""

    MODULE = "harness.benchmarks.disk_beside_compute"

    def __init__(self, model_dir: Path, decode_threads: int | None) -> None:
        cmd = [sys.executable, "-m", self.MODULE, "--decode-child", str(model_dir)]
        if decode_threads is not None:
            cmd += ["--decode-threads", str(decode_threads)]
        # A file, not a pipe: warnings must never block the process. Closed by close().
        self._stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self.steps: list[tuple[float, float]] = []
        """(arrival time, median step ms) of each sequence the process finished."""
        self._reader: threading.Thread | None = None
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().strip()
        if first != READY:
            why = self.close() or first or f"exit {self.proc.returncode}"
            raise click.ClickException(f"the decoding process did not start: {why}")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.steps.append((time.perf_counter(), float(line)))

    def hold(self, compute: bool) -> None:
        self.proc.send_signal(signal.SIGCONT if compute else signal.SIGSTOP)

    def steps_between(self, start: float, end: float) -> list[float]:
        return [ms for t, ms in self.steps if start <= t <= end]

    def close(self) -> str:
        """Stop the process; the last line it wrote to stderr."""
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL ends a stopped process too
        self.proc.wait()
        if self._reader is not None:
            self._reader.join()  # it ends at the closed pipe's end
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self._stderr.seek(0)
        lines = self._stderr.read().strip().splitlines()
        self._stderr.close()
        return lines[-1] if lines else ""

    def __enter__(self) -> DecodeBeside:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def fio_reads() -> bool:
    """Whether fio reads here (installed, and io_uring works), else the profiler's own loop."""
    return fio_path() is not None and resolve_backend() == "io_uring"


def read_rate(experts_file: Path, job: JobSpec, seed: int) -> float:
    """Bytes/s of one random-read job on the expert file, by fio or the profiler's loop (`fio_reads`)."""
    size = experts_file.stat().st_size
    if fio_reads():
        cmd = fio_command(job, str(experts_file), size, ioengine="io_uring", readonly=True, seed=seed)
        return run_fio(cmd, job)[1].bw_bytes_per_s
    return run_job(job, str(experts_file), size, seed=seed).bw_bytes_per_s


def reader_name() -> str:
    if fio_reads():
        return "fio (io_uring, --direct=1)"
    return f"the profiler's loop ({resolve_backend()}, O_DIRECT; fio with io_uring is not available)"


@click.command()
@click.option("--model", help="Model folder (packed).")
@click.option("--ssd", default=None, help="Folder on the SSD for the expert file (as `harness run --ssd`).")
@click.option("--io-depth", type=click.IntRange(min=1), default=1, show_default=True, help="Reads in flight.")
@click.option("--rounds", type=click.IntRange(min=1), default=4, show_default=True, help="Pairs of measurements.")
@click.option("--read-seconds", type=click.FloatRange(min=0.1), default=5.0, show_default=True)
@click.option("--ramp-seconds", type=click.FloatRange(min=0.0), default=1.0, show_default=True)
@click.option("--decode-threads", type=click.IntRange(min=1), default=None, help="torch threads (default: torch's).")
@click.option("--decode-child", type=click.Path(path_type=Path), default=None, hidden=True)
def main(
    model: str | None,
    ssd: str | None,
    io_depth: int,
    rounds: int,
    read_seconds: float,
    ramp_seconds: float,
    decode_threads: int | None,
    decode_child: Path | None,
) -> None:
    if decode_child is not None:
        decode_forever(decode_child, decode_threads)
        return
    if model is None:
        raise click.UsageError("--model is required")
    packed = pack_paths(Path(model))
    if not packed["index"].is_file():
        raise click.UsageError(f"{model} is not packed ({packed['index']} is missing): run `harness run` once")
    index = PackIndex.load(packed["index"])
    experts = place_expert_file(index, packed, ssd, model_name(Path(model)))
    job = JobSpec("randread", index.stride_bytes, io_depth, True, read_seconds, ramp_seconds, 1)
    click.echo(
        f"random reads of {index.stride_bytes} B at queue depth {io_depth} on {experts} by {reader_name()}, alone and "
        f"beside a resident decode of {model}"
    )
    ratios = []
    with DecodeBeside(Path(model), decode_threads) as decode:
        decode.hold(compute=False)
        for pair in range(rounds):
            order = ("alone", "beside") if pair % 2 == 0 else ("beside", "alone")
            got: dict[str, float] = {}
            steps: list[float] = []
            for how in order:
                decode.hold(compute=how == "beside")
                start = time.perf_counter()
                got[how] = read_rate(experts, job, seed=pair)
                if how == "beside":
                    steps = decode.steps_between(start, time.perf_counter())
                decode.hold(compute=False)
            ratios.append(got["beside"] / got["alone"])
            step = f"{statistics.median(steps):.1f} ms per decode step" if steps else "no decode sequence finished"
            click.echo(
                f"pair {pair} ({', '.join(order)}): alone {got['alone'] / 1e6:6.0f} MB/s, beside decode "
                f"{got['beside'] / 1e6:6.0f} MB/s ({ratios[-1]:.3f}); {step} beside the reads"
            )
    median = statistics.median(ratios)
    click.echo(f"median beside/alone {median:.3f} (range {min(ratios):.3f}-{max(ratios):.3f}) over {rounds} pairs")
    click.echo(
        f"a run held by this disk cannot get below decode_floor_ratio {1 / median:.2f} here (against a profile "
        "measured on an idle machine), however its reads are scheduled"
    )


if __name__ == "__main__":
    main()
