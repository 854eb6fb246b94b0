"""The profiler on tiny test files: the fio parser, histograms, the I/O engine, refusals, cleanup, read-time model."""

from __future__ import annotations

import copy
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli.ssd import profile_ssd_command
from harness.errors import HarnessError
from harness.ssd import engine, target, uring
from harness.ssd.fio import load_fio_json, parse_fio_json
from harness.ssd.jobs import (
    JobResult,
    JobSpec,
    LatencyHistogram,
    bucket_index,
    bucket_value_ns,
    merge_results,
    percentiles_from,
)
from harness.ssd.plots import write_plots
from harness.ssd.profiler import (
    PROFILE_SCHEMA,
    ProfileRequest,
    expert_bytes_from_model,
    parse_block_sizes,
    run_profile,
)
from harness.ssd.readtime import ReadTimeModel, load_profile_for_path
from harness.ssd.target import TEST_FILE_PREFIX, check_folder, create_test_file, open_target, remove_stale_test_files

DATA = Path(__file__).parent / "data"
FIO_JSON = DATA / "fio_randread_1m_qd4.json"
MIB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent


def _request(folder: Path, **overrides: object) -> ProfileRequest:
    fields: dict[str, object] = {
        "path": folder,
        "device": None,
        "size_bytes": 4 * MIB,
        "block_sizes": [64 * 1024, MIB],
        "queue_depths": [1, 2],
        "runtime_s": 0.1,
        "ramp_s": 0.02,
        "min_ios": 8,
        "out": folder / "profiles" / "disk.json",
    }
    fields.update(overrides)
    return ProfileRequest(**fields)  # type: ignore[arg-type]


def _test_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(TEST_FILE_PREFIX)]


# --- fio JSON ------------------------------------------------------------------------------------


def test_fio_parser_converts_units_once() -> None:
    doc = load_fio_json(FIO_JSON)
    raw = doc["jobs"][0]["read"]
    (result,) = parse_fio_json(doc)
    assert result.engine == "fio" and result.backend == "io_uring"
    spec = result.spec
    assert (spec.rw, spec.bs_bytes, spec.iodepth, spec.direct) == ("randread", MIB, 4, True)
    assert (spec.runtime_s, spec.ramp_s) == (1.0, 0.2)
    assert result.bytes == raw["io_bytes"]
    assert result.ios == raw["total_ios"]
    assert result.elapsed_s == pytest.approx(raw["runtime"] / 1000)  # ms -> s
    assert result.bw_bytes_per_s == pytest.approx(raw["bw_bytes"], rel=1e-3)
    assert result.bw_bytes_per_s == pytest.approx(raw["bw"] * 1024, rel=1e-3)  # KiB/s -> B/s
    assert result.iops == pytest.approx(raw["iops"], rel=1e-3)
    assert result.lat_mean_s == pytest.approx(raw["clat_ns"]["mean"] * 1e-9)
    # Percentiles come from fio's bins merged into our histogram; they agree with fio's own table
    # to within one of our buckets (1/64 of the value).
    for p, key in ((50.0, "50.000000"), (99.0, "99.000000"), (99.9, "99.900000")):
        assert result.percentiles_s[p] == pytest.approx(raw["clat_ns"]["percentile"][key] * 1e-9, rel=1 / 64)
    assert result.hist is not None and result.hist.total == sum(raw["clat_ns"]["bins"].values())


def test_fio_parser_without_bins_uses_the_percentile_table() -> None:
    doc = copy.deepcopy(load_fio_json(FIO_JSON))
    del doc["jobs"][0]["read"]["clat_ns"]["bins"]
    (result,) = parse_fio_json(doc)
    assert result.hist is None
    assert result.percentiles_s[90.0] == doc["jobs"][0]["read"]["clat_ns"]["percentile"]["90.000000"] * 1e-9


def test_histogram_buckets_are_within_one_64th() -> None:
    for ns in [0, 1, 63, 64, 65, 127, 128, 1000, 4095, 123_456, 9_876_543_210]:
        value = bucket_value_ns(bucket_index(ns))
        assert abs(value - ns) <= max(ns / 64, 0.5)
    indices = [bucket_index(ns) for ns in range(0, 100_000, 7)]
    assert indices == sorted(indices)


def test_merged_histogram_is_the_union_not_averaged_percentiles() -> None:
    fast, slow, union = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    for ns in range(1000, 2000):
        fast.add_ns(ns)
        union.add_ns(ns)
    for ns in range(100_000, 100_100):
        slow.add_ns(ns)
        union.add_ns(ns)
    merged = LatencyHistogram()
    merged.merge(fast)
    merged.merge(slow)
    assert merged.counts == union.counts
    p99 = merged.percentile_s(99.0)
    assert p99 is not None and p99 > 90e-6  # 1100 samples: the top 1 % are the slow ones
    averaged = (fast.percentile_s(99.0) + slow.percentile_s(99.0)) / 2  # type: ignore[operator]
    assert abs(p99 - averaged) > 40e-6


def test_merge_results_adds_slices_and_merges_histograms() -> None:
    spec = JobSpec("randread", 4096, 1, True, 1.0, 0.0, 1)
    parts = []
    for base_ns in (10_000, 1_000_000):
        hist = LatencyHistogram()
        for k in range(100):
            hist.add_ns(base_ns + k)
        parts.append(JobResult(spec, "harness", "threads", 100, 409600, 0.5, base_ns * 1e-9, base_ns * 1e-9, {}, hist))
    merged = merge_results(parts)
    assert (merged.ios, merged.bytes, merged.elapsed_s) == (200, 819200, 1.0)
    assert merged.bw_bytes_per_s == 819200
    assert merged.lat_mean_s == pytest.approx((10_000 + 1_000_000) / 2 * 1e-9)
    assert merged.percentiles_s[50.0] == pytest.approx(10_050e-9, rel=1 / 64)
    assert merged.percentiles_s[90.0] == pytest.approx(1e-3, rel=1 / 64)


# --- the engine ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", engine.BACKENDS)
@pytest.mark.parametrize(("rw", "direct"), [("read", True), ("randread", True), ("randread", False), ("write", True)])
def test_engine_job_meets_minimums(tmp_path: Path, rw: str, direct: bool, backend: str) -> None:
    if backend == "io_uring" and uring.unavailable_reason():
        pytest.skip(uring.unavailable_reason())
    path = tmp_path / "f.bin"
    create_test_file(path, 2 * MIB)
    if direct and not target.probe_o_direct(tmp_path)[0]:
        pytest.skip("no O_DIRECT on the test folder's filesystem")
    spec = JobSpec(rw, 64 * 1024, 2, direct, runtime_s=0.1, ramp_s=0.02, min_ios=50)
    result = engine.run_job(spec, str(path), 2 * MIB, backend=backend)
    assert result.ios >= 50 and result.bytes == result.ios * 64 * 1024
    assert result.elapsed_s >= 0.1 * 0.9
    assert result.backend == backend
    assert result.huge_page_share is not None and 0.0 <= result.huge_page_share <= 1.0
    assert result.hist is not None and result.hist.total == result.ios
    p = result.percentiles_s
    assert p[50.0] is not None and p[50.0] <= p[90.0] <= p[99.0] <= p[99.9]  # type: ignore[operator]
    assert percentiles_from(result.hist) == p


@pytest.mark.skipif(uring.unavailable_reason() is not None, reason=str(uring.unavailable_reason()))
def test_ring_requests_rotate_over_the_buffers_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.bin"
    create_test_file(path, 2 * MIB)
    spec = JobSpec("randread", 64 * 1024, 2, False, runtime_s=0.05, ramp_s=0.0, min_ios=20)
    addresses: list[int] = []
    prepare = uring.Ring.prepare

    def record(ring: uring.Ring, opcode: int, fd: int, address: int, *rest: int) -> None:
        addresses.append(address)
        prepare(ring, opcode, fd, address, *rest)

    monkeypatch.setattr(uring.Ring, "prepare", record)
    result = engine.run_job(spec, str(path), 2 * MIB, backend="io_uring", buffers=5)
    assert result.ios >= 20
    base = min(addresses)
    slots = [(a - base) // (64 * 1024) for a in addresses]
    # Depth 2 over 5 buffers: a freed buffer joins the back of the queue behind at least 5 - 2 others, each request
    # taking the one freed longest ago, so any 4 consecutive requests use 4 distinct buffers (with one buffer per
    # request in flight, as fio, they would use 2).
    assert set(slots) == set(range(5))
    assert all(len(set(slots[i : i + 4])) == 4 for i in range(len(slots) - 3))
    default: list[int] = []
    monkeypatch.setattr(
        uring.Ring, "prepare", lambda ring, op, fd, a, *rest: (default.append(a), prepare(ring, op, fd, a, *rest))
    )
    engine.run_job(spec, str(path), 2 * MIB, backend="io_uring")
    assert len(set(default)) == 2
    with pytest.raises(ValueError, match="1 rotating buffers need the io_uring backend and at least 2"):
        engine.run_job(spec, str(path), 2 * MIB, backend="io_uring", buffers=1)


def test_backend_choice_falls_back_to_threads_and_refuses_what_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(HarnessError, match="unknown I/O backend 'aio'"):
        engine.resolve_backend("aio")
    monkeypatch.setattr(engine.uring, "unavailable_reason", lambda: "io_uring unusable here (Operation not permitted)")
    assert engine.resolve_backend("auto") == "threads"
    assert engine.resolve_backend("threads") == "threads"
    with pytest.raises(HarnessError, match=r"not permitted\): use --io-backend threads"):
        engine.resolve_backend("io_uring")
    monkeypatch.setattr(engine.uring, "unavailable_reason", lambda: None)
    assert engine.resolve_backend("auto") == "io_uring"


def test_write_opens_only_regular_files(tmp_path: Path) -> None:
    for node in ("/dev/null", "/dev/zero"):
        with pytest.raises(AssertionError, match="not a regular file"):
            open_target(node, write=True, direct=False)
    block_devices = [Path("/dev") / p.name for p in Path("/sys/block").iterdir() if (Path("/dev") / p.name).exists()]
    for node in block_devices[:2]:
        with pytest.raises(AssertionError, match="not a regular file"):
            open_target(node, write=True, direct=True)
    link = tmp_path / "link"
    link.symlink_to("/dev/null")
    with pytest.raises(AssertionError):
        open_target(link, write=True, direct=False)


def test_test_file_is_real_data(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    create_test_file(path, 3 * MIB + 4096)
    st = path.stat()
    assert st.st_size == 3 * MIB + 4096
    assert st.st_blocks * 512 >= st.st_size  # allocated, not sparse
    data = path.read_bytes()
    assert len(set(data[:65536])) > 250  # random bytes, not zeros


# --- refusals ------------------------------------------------------------------------------------


def test_refuses_missing_path_and_non_folder(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="does not exist"):
        check_folder(tmp_path / "missing", MIB, direct_required=False)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(HarnessError, match="not a folder"):
        check_folder(tmp_path / "file", MIB, direct_required=False)


def test_refuses_too_little_free_space(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="too little free space"):
        check_folder(tmp_path, 1024**5, direct_required=False)


def test_refuses_without_permission(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root passes every mode check, so the kernel's answer is replaced, not the folder's mode.
    monkeypatch.setattr(target.os, "access", lambda path, mode: False)
    with pytest.raises(HarnessError, match="no permission"):
        check_folder(tmp_path, MIB, direct_required=False)


def test_o_direct_required_or_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(target, "probe_o_direct", lambda folder: (False, "open(O_DIRECT) refused: Invalid argument"))
    with pytest.raises(HarnessError, match="does not support O_DIRECT"):
        check_folder(tmp_path, MIB, direct_required=True)
    assert check_folder(tmp_path, MIB, direct_required=False) is False


def test_cli_refusals_are_one_line(tmp_path: Path) -> None:
    from harness.cli import main

    runner = CliRunner()
    cases = [
        (["profile-ssd", "--path", str(tmp_path / "missing"), "--size", "1MiB"], "does not exist"),
        (["profile-ssd", "--device", str(tmp_path), "--size", "1MiB"], "not a block device"),
        (["profile-ssd", "--path", str(tmp_path), "--size", "1 furlong"], "cannot read size"),
        (["profile-ssd", "--path", str(tmp_path), "--size", "2EiB"], "beyond 1 EiB"),
        (["profile-ssd", "--path", str(tmp_path), "--size", "1024TiB"], "too little free space"),
        (["profile-ssd", "--path", str(tmp_path), "--block-size", "expert"], "needs --model"),
    ]
    for args, message in cases:
        result = runner.invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output
        assert result.output.strip().count("\n") == 0
    usage = runner.invoke(profile_ssd_command, ["--device", "/dev/null", "--write"])
    assert usage.exit_code == 2 and "--write is refused with --device" in usage.output
    assert list(tmp_path.iterdir()) == []


# --- cleanup -------------------------------------------------------------------------------------


def test_test_file_removed_after_interrupt_inside_a_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[Path]] = []

    def interrupted(spec: JobSpec, path: str, region: int, **kwargs: object) -> None:
        seen.append(_test_files(tmp_path))
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "run_job", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_profile(_request(tmp_path))
    assert len(seen) == 1 and len(seen[0]) == 1  # the file existed while the job ran
    assert _test_files(tmp_path) == []


def test_test_file_removed_after_sigint_to_a_running_profile(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from harness.ssd.profiler import ProfileRequest, run_profile; "
        "run_profile(ProfileRequest(path=Path(sys.argv[1]), device=None, size_bytes=4 << 20, block_sizes=[65536], "
        "queue_depths=[2], runtime_s=30.0, ramp_s=0.0, min_ios=1, out=Path(sys.argv[1]) / 'p.json'))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not _test_files(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _test_files(tmp_path), "the profile never created its test file"
    time.sleep(0.5)  # into the 30 s job
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode != 0 and b"KeyboardInterrupt" in stderr
    assert _test_files(tmp_path) == []
    assert not (tmp_path / "p.json").exists()


def test_stale_test_file_of_a_dead_process_is_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{TEST_FILE_PREFIX}{dead.pid}-abcd1234.bin"
    stale.write_bytes(b"x")
    mine = tmp_path / f"{TEST_FILE_PREFIX}{os.getpid()}-abcd1234.bin"
    mine.write_bytes(b"x")
    assert remove_stale_test_files(tmp_path) == [stale]
    assert not stale.exists() and mine.exists()


# --- the whole profile and the read-time model -----------------------------------------------------


def test_profile_end_to_end_and_read_time_model(tmp_path: Path) -> None:
    doc = run_profile(_request(tmp_path, write=True))
    assert _test_files(tmp_path) == []
    out = Path(doc["profile_path"])
    stored = json.loads(out.read_text())
    assert stored["schema"] == PROFILE_SCHEMA and stored["schema_version"] == 1
    assert stored["effective"]["backend"] == engine.resolve_backend("auto")
    assert stored["requested"]["block_sizes_bytes"] == [64 * 1024, MIB]
    for plot in stored["plots"]:
        assert Path(plot).stat().st_size > 1000
    names = {j["name"] for j in stored["jobs"]}
    direct = stored["effective"]["direct"]
    mode = "direct" if direct else "buffered"
    assert f"randread-bs{MIB}-qd2-{mode}" in names and f"write-bs{MIB}-qd1-{mode}" in names
    if direct:
        assert f"read-bs{MIB}-qd1-buffered" in names
    for job in stored["jobs"]:
        assert job["ios"] >= 8 and job["bw_bytes_per_s"] > 0
        assert {"lat_p50_s", "lat_p90_s", "lat_p99_s", "lat_p99_9_s", "iops"} <= set(job)

    model = ReadTimeModel.from_profile(out)
    job = next(j for j in stored["jobs"] if j["name"] == f"randread-bs{MIB}-qd2-{mode}")
    assert model.bandwidth_bytes_per_s(MIB, 2) == pytest.approx(job["bw_bytes_per_s"])
    assert model.seconds(4 * MIB, queue_depth=2, block_size=MIB) == pytest.approx(4 * MIB / job["bw_bytes_per_s"])
    assert model.seconds(0) == 0.0


def _synthetic_profile(grid: dict[tuple[int, int], float]) -> dict[str, object]:
    jobs = [
        {"engine": "harness", "rw": "randread", "bs_bytes": bs, "iodepth": qd, "direct": True, "ios": 100}
        | {"bw_bytes_per_s": bw, "lat_p50_s": bs / bw * qd}
        for (bs, qd), bw in grid.items()
    ]
    return {"schema": PROFILE_SCHEMA, "effective": {"direct": True}, "device": {"disk": "x"}, "jobs": jobs}


def test_read_time_model_interpolates_in_log_space_and_clamps() -> None:
    grid = {(4096, 1): 40e6, (4096, 4): 160e6, (MIB, 1): 1000e6, (MIB, 4): 2000e6}
    model = ReadTimeModel.from_document(_synthetic_profile(grid))
    assert model.bandwidth_bytes_per_s(MIB, 4) == 2000e6
    assert model.bandwidth_bytes_per_s(MIB, 2) == pytest.approx(1500e6)  # halfway in log2(qd)
    assert model.bandwidth_bytes_per_s(MIB, 64) == 2000e6  # held at the edge, not extrapolated
    assert model.bandwidth_bytes_per_s(64 * 1024, 1) == pytest.approx(520e6)  # halfway in log2(bs)
    # One 1 MiB read cannot use depth 4: it costs the depth-1 time.
    assert model.seconds(MIB, queue_depth=4) == pytest.approx(MIB / 1000e6)
    assert model.seconds(8 * MIB, queue_depth=4, block_size=MIB) == pytest.approx(8 * MIB / 2000e6)
    assert model.latency_s(MIB, 1) == pytest.approx(MIB / 1000e6)
    with pytest.raises(HarnessError):
        ReadTimeModel.from_document({"schema": "other"})


@pytest.mark.skipif(uring.unavailable_reason() is not None, reason=str(uring.unavailable_reason()))
def test_a_profile_whose_reads_rotate_over_buffers_says_so(tmp_path: Path) -> None:
    doc = run_profile(_request(tmp_path, buffers=6, buffered=False, io_backend="io_uring"))
    stored = json.loads(Path(doc["profile_path"]).read_text())
    assert stored["requested"]["buffers"] == 6
    assert ReadTimeModel.from_profile(doc["profile_path"]).source.endswith(" (reads rotating over 6 buffers)")
    assert _test_files(tmp_path) == []


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"buffers": 1}, "--buffers 1 is fewer than --queue-depth 2: every request in flight needs its own buffer"),
        ({"buffers": 4, "with_fio": True}, "--buffers with --fio: fio reads into one buffer per request in flight"),
        ({"buffers": 4, "io_backend": "threads"}, "--buffers rotates the requests of an io_uring ring; this profile"),
        ({"buffers": 2000}, "--buffers 2000 x the largest block size 1.00 MiB is more than 1.00 GiB of buffers"),
    ],
)
def test_buffers_that_cannot_hold_are_refused_before_any_file(tmp_path: Path, overrides: dict, says: str) -> None:
    with pytest.raises(HarnessError, match=re.escape(says)):
        run_profile(_request(tmp_path, **overrides))
    assert _test_files(tmp_path) == [] and not (tmp_path / "profiles").exists()


def test_load_profile_for_path_finds_this_disk(tmp_path: Path) -> None:
    from harness.ssd.devices import block_device_for_path

    disk = block_device_for_path(tmp_path)
    if disk is None:
        pytest.skip("the test folder is on no block device")
    profiles = tmp_path / "hardware_profiles"
    assert load_profile_for_path(tmp_path, profiles) is None
    folder = profiles / platform.node()
    folder.mkdir(parents=True)
    (folder / f"{disk}.json").write_text(json.dumps(_synthetic_profile({(MIB, 1): 500e6})))
    model = load_profile_for_path(tmp_path, profiles)
    assert model is not None and model.seconds(MIB) == pytest.approx(MIB / 500e6)


# --- expert sizes ----------------------------------------------------------------------------------


def test_expert_size_from_config_and_block_size_list(tmp_path: Path) -> None:
    config = {"hidden_size": 4096, "intermediate_size": 14336, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert expert_bytes_from_model(tmp_path) == 3 * 4096 * 14336 * 2  # Mixtral-8x7B: 336 MiB, already aligned
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "index.json").write_text(json.dumps({"stride_bytes": 3 * MIB}))
    assert expert_bytes_from_model(tmp_path) == 3 * MIB
    sizes, labels = parse_block_sizes("1MiB,expert,4KiB,1MiB", 3 * MIB - 100)
    assert sizes == [4096, MIB, 3 * MIB] and labels == {3 * MIB: "expert"}
    with pytest.raises(HarnessError, match="multiple of 512"):
        parse_block_sizes("1000", None)


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed (apt-get install fio)")
def test_fio_runs_interleaved_on_the_same_file(tmp_path: Path) -> None:
    request = _request(tmp_path, block_sizes=[MIB], queue_depths=[1], with_fio=True, buffered=False, rounds=2)
    doc = run_profile(request)
    assert _test_files(tmp_path) == []
    assert [j["engine"] for j in doc["jobs"]] == ["harness", "fio", "harness", "fio"]
    (row, _) = doc["fio_comparison"]
    assert row["bw_ratio"] > 0 and doc["tools"]["fio"].startswith("fio-")
    fio_docs = json.loads(Path(doc["fio_output"]).read_text())
    read, randread = f"read-bs{MIB}-qd1-direct", f"randread-bs{MIB}-qd1-direct"
    assert [(d["job"], d["round"]) for d in fio_docs] == [(read, 0), (read, 1), (randread, 0), (randread, 1)]
    assert "--direct=1" in fio_docs[0]["command"]
    # The fio job's figures are the two slices added up, percentiles from their merged bins.
    fio_read = next(j for j in doc["jobs"] if j["engine"] == "fio" and j["name"] == read)
    slices = [parse_fio_json(d["output"])[0] for d in fio_docs[:2]]
    assert fio_read["bytes"] == sum(r.bytes for r in slices)
    assert fio_read["elapsed_s"] == pytest.approx(sum(r.elapsed_s for r in slices))
    # Each round pairs the two runs made back to back; who went first alternates by job and round.
    rounds = doc["fio_rounds"][read]
    assert [(r["round"], r["first"]) for r in rounds] == [(0, "harness"), (1, "fio")]
    assert [r["fio_bw_bytes_per_s"] for r in rounds] == [r.bw_bytes_per_s for r in slices]
    assert doc["fio_rounds"][randread][0]["first"] == "fio"
    ratios = [r["harness_bw_bytes_per_s"] / r["fio_bw_bytes_per_s"] for r in rounds]
    assert row["round_ratios"] == ratios and row["round_ratio_median"] == pytest.approx(sum(ratios) / 2)


def test_plots_of_a_profile_without_some_jobs_say_so_without_warnings(tmp_path: Path) -> None:
    """A profile with random reads only, without latency percentiles: each empty panel gets a note, not an empty
    legend (matplotlib warned: 'No artists with labels found')."""
    job = {"engine": "harness", "direct": True, "rw": "randread", "bs_bytes": MIB, "iodepth": 1, "bw_bytes_per_s": 2e9}
    doc = {"jobs": [job, {**job, "iodepth": 4, "bw_bytes_per_s": 3e9}], "host": "h", "device": {"disk": "d"}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = write_plots(doc, tmp_path / "p.json")
    assert [p.name for p in paths] == ["p-bandwidth.png", "p-latency.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
