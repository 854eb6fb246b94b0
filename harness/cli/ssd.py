"""`harness devices` and `harness profile-ssd`: parse options, delegate to harness.ssd, print."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from harness.cli.console import make_console
from harness.cli.output import echo_json
from harness.ssd.devices import describe_path, list_devices
from harness.units import format_bytes, parse_duration, parse_size

DEFAULT_BLOCK_SIZES = "4KiB,128KiB,1MiB,expert"


def _yes_no(value: bool | None) -> str:
    return "?" if value is None else "yes" if value else "no"


def _size(value: int | None) -> str:
    return format_bytes(value) if value is not None else "?"


@click.command("devices")
@click.option("--path", "path", type=click.Path(path_type=Path), help="Name the device and filesystem holding PATH.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON instead of a table.")
@click.option("--all", "include_empty", is_flag=True, help="Include empty devices (unused loop, zram).")
def devices_command(path: Path | None, as_json: bool, include_empty: bool) -> None:
    """List block devices (pyudev, else sysfs): identity, transport, block sizes, scheduler, mounts."""
    if path is not None:
        info = describe_path(path)
        if as_json:
            echo_json(info)
            return
        table = Table(title=f"{info['path']}", show_header=False)
        for key, value in info.items():
            table.add_row(key, str(value))
        make_console().print(table)
        return
    devices = list_devices(include_empty=include_empty)
    if as_json:
        echo_json(devices)
        return
    table = Table(title="block devices")
    for column in ("name", "model", "serial", "transport", "rotational", "media", "size", "lbs/pbs", "sched", "mounts"):
        table.add_column(column)
    for d in devices:
        mounts = [f"{m['mountpoint']} ({m['filesystem']})" for m in d["mounts"]]
        mounts += [f"{p['name']}: {m['mountpoint']} ({m['filesystem']})" for p in d["partitions"] for m in p["mounts"]]
        mounts += [f"{p['name']}: -" for p in d["partitions"] if not p["mounts"]]
        table.add_row(
            d["name"],
            d["model"] or "?",
            d["serial"] or "?",
            d["transport"],
            _yes_no(d["rotational"]),
            d["media"],
            _size(d["size_bytes"]),
            f"{d['logical_block_bytes']}/{d['physical_block_bytes']}",
            d["scheduler"] or "?",
            "\n".join(mounts) or "-",
        )
    console = make_console()
    console.print(table)
    if any(d["source"] == "sysfs" for d in devices):
        console.print("note: udev has no properties here (no udevd?); fields come from sysfs", style="yellow")


@click.command("profile-ssd")
@click.option("--path", type=click.Path(path_type=Path), help="Folder on the filesystem to profile (test file).")
@click.option("--device", help="Raw block device to profile read-only, e.g. /dev/nvme0n1 (never written).")
@click.option("--size", default="4GiB", show_default=True, help="Test file size (or region of --device).")
@click.option("--block-size", default=DEFAULT_BLOCK_SIZES, show_default=True, help="bs list; 'expert' = expert size.")
@click.option("--queue-depth", default="1,2,4,8,16,32", show_default=True, help="iodepth list.")
@click.option("--runtime", default="5s", show_default=True, help="Minimum measured time per job.")
@click.option(
    "--ramp",
    default="2s",
    show_default=True,
    help="Ramp time per job, not measured; longer than any burst the device gives after idling.",
)
@click.option(
    "--rounds",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Run each job N times (each --runtime long), alternating with fio, and merge the slices.",
)
@click.option("--min-ios", default=64, show_default=True, type=click.IntRange(0), help="Minimum measured I/Os per job.")
@click.option("--model", type=click.Path(path_type=Path), help="Checkpoint folder whose expert size 'expert' means.")
@click.option("--expert-size", help="Expert size for 'expert' when no --model is given, e.g. 3MiB.")
@click.option("--write", is_flag=True, help="Also measure writes (to the test file only).")
@click.option("--fio", "with_fio", is_flag=True, help="Run the equivalent fio jobs interleaved and compare.")
@click.option("--no-buffered", is_flag=True, help="Skip the buffered (page-cache) comparison reads.")
@click.option(
    "--direct",
    type=click.Choice(["required", "auto"]),
    default="required",
    show_default=True,
    help="auto: fall back to buffered reads where O_DIRECT is unsupported (recorded in the profile).",
)
@click.option(
    "--io-backend",
    type=click.Choice(["auto", "io_uring", "threads"]),
    default="auto",
    show_default=True,
    help="How the harness reaches queue depth: io_uring where the kernel allows it (auto), or Q threads.",
)
@click.option(
    "--buffers",
    type=click.IntRange(1),
    default=None,
    help="Rotate each job's requests over N block buffers (io_uring; not with --fio), as a cache's reads land in "
    "many slots; default one per request in flight, as fio. Where a read's destination costs (a VM), a profile "
    "with --buffers 192 gives the I/O floor the bandwidth a cache sees.",
)
@click.option(
    "--out", type=click.Path(path_type=Path), help="Profile file (default hardware_profiles/<host>/<dev>.json)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the whole profile as JSON instead of tables.")
def profile_ssd_command(
    path: Path | None,
    device: str | None,
    size: str,
    block_size: str,
    queue_depth: str,
    runtime: str,
    ramp: str,
    rounds: int,
    min_ios: int,
    model: Path | None,
    expert_size: str | None,
    write: bool,
    with_fio: bool,
    no_buffered: bool,
    direct: str,
    io_backend: str,
    buffers: int | None,
    out: Path | None,
    as_json: bool,
) -> None:
    """Measure read bandwidth, IOPS and latency percentiles per block size x queue depth (O_DIRECT)."""
    from harness.ssd.profiler import (
        DEFAULT_PROFILES_DIR,
        ProfileRequest,
        expert_bytes_from_model,
        parse_block_sizes,
        parse_queue_depths,
        run_profile,
    )

    if (path is None) == (device is None):
        raise click.UsageError("give exactly one of --path DIR or --device /dev/X")
    if device is not None and write:
        raise click.UsageError("--write is refused with --device: a raw device is only ever read")
    expert_bytes = expert_bytes_from_model(model) if model else parse_size(expert_size) if expert_size else None
    if expert_bytes is None and block_size == DEFAULT_BLOCK_SIZES:
        block_size = DEFAULT_BLOCK_SIZES.replace(",expert", "")
    sizes, labels = parse_block_sizes(block_size, expert_bytes)
    request = ProfileRequest(
        path=path,
        device=device,
        size_bytes=parse_size(size),
        block_sizes=sizes,
        queue_depths=parse_queue_depths(queue_depth),
        runtime_s=parse_duration(runtime),
        ramp_s=parse_duration(ramp),
        min_ios=min_ios,
        rounds=rounds,
        write=write,
        with_fio=with_fio,
        buffered=not no_buffered,
        direct=direct,
        io_backend=io_backend,
        buffers=buffers,
        expert_bytes=expert_bytes,
        out=out,
        profiles_dir=DEFAULT_PROFILES_DIR,
        labels=labels,
    )
    console = make_console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("profile", total=None)

        def on_progress(done: int, total: int, label: str) -> None:
            progress.update(task, completed=done, total=total, description=label)

        doc = run_profile(request, on_progress)
    if as_json:
        echo_json(doc)
        return
    _print_summary(doc)


def _print_summary(doc: dict[str, Any]) -> None:
    console = make_console()
    device = doc["device"]
    table = Table(title=f"{device.get('disk')} ({device.get('filesystem')}), backend {doc['effective']['backend']}")
    for column in ("job", "engine", "MB/s", "IOPS", "p50 ms", "p99 ms", "p99.9 ms"):
        table.add_column(column, justify="right" if column != "job" else "left")
    for j in doc["jobs"]:

        def ms(key: str, job: dict[str, Any] = j) -> str:
            return f"{job[key] * 1e3:.3f}" if job.get(key) is not None else "-"

        table.add_row(
            j["name"],
            j["engine"],
            f"{j['bw_bytes_per_s'] / 1e6:.1f}",
            f"{j['iops']:.0f}",
            ms("lat_p50_s"),
            ms("lat_p99_s"),
            ms("lat_p99_9_s"),
        )
    console.print(table)
    if doc["fio_comparison"]:
        ratios = Table(title=f"harness vs fio ({doc['tools']['fio']}, {doc['effective']['fio_ioengine']}), interleaved")
        columns = ("job", "harness MB/s", "fio MB/s", "ratio", "round ratios (median)", "p50 ms h/fio", "p99 ms h/fio")
        for column in columns:
            ratios.add_column(column, justify="right" if column != "job" else "left")
        for row in doc["fio_comparison"]:

            def pair(key: str, r: dict[str, Any] = row) -> str:
                h, f = r[f"harness_{key}"], r[f"fio_{key}"]
                return f"{h * 1e3:.2f}/{f * 1e3:.2f}" if h is not None and f is not None else "-"

            ratio, median = row["bw_ratio"], row["round_ratio_median"]
            ratios.add_row(
                row["job"],
                f"{row['harness_bw_bytes_per_s'] / 1e6:.1f}",
                f"{row['fio_bw_bytes_per_s'] / 1e6:.1f}",
                f"{ratio:.3f}" if ratio is not None else "-",
                " ".join(f"{r:.2f}" for r in row["round_ratios"]) + (f" ({median:.3f})" if median is not None else ""),
                pair("lat_p50_s"),
                pair("lat_p99_s"),
            )
        console.print(ratios)
    for reason in doc["validity"]["reasons"]:
        console.print(reason, style="yellow")
    console.print(f"profile: {doc['profile_path']}")
    for plot in doc.get("plots", []):
        console.print(f"plot: {plot}")


commands: list[click.Command] = [devices_command, profile_ssd_command]
