"""Verified expert bytes, pack provenance and the Hugging Face cache: a damaged pack, a damaged --ssd
copy or a config.json changed after packing stops a run with one line naming what failed (before any
token); `model pack` re-packs a damaged pack; a read-only Hugging Face cache is never written into."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cache.book import ExpertCacheBook
from harness.cli import main
from harness.errors import HarnessError
from harness.iomem import IoBuffer
from harness.models import locate
from harness.models.locate import model_name, pack_dir, resolve_model_dir
from harness.models.packer import pack_model, pack_paths
from harness.models.provenance import pack_content_hashes
from harness.runtime.strategies.mapped import MappedExperts, StaticPlacement
from harness.store.layout import PackIndex
from harness.store.placement import place_expert_file
from harness.store.reader import ExpertReader, verify_expert_file


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from harness.models.factory import create_model

    out = tmp_path_factory.mktemp("verified") / "tiny"
    create_model("olmoe", "tiny", out, seed=0)
    pack_model(out)
    return out


@pytest.fixture
def model(packed: Path, tmp_path: Path) -> Path:
    """A private copy of the packed tiny model, free to damage."""
    return Path(shutil.copytree(packed, tmp_path / "model"))


def index_of(model_dir: Path) -> PackIndex:
    return PackIndex.load(pack_paths(model_dir)["index"])


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr.strip()


def run_model(model: str | Path, results: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(
        "run",
        "--model",
        str(model),
        "--cache-experts",
        "2",
        "--max-prompts",
        "1",
        "--max-new-tokens",
        "2",
        "--results",
        str(results),
        "--quiet",
        *extra,
    )


def assert_fails_naming(outcome: tuple[int, str, str], results: Path, pattern: str) -> None:
    """Exit non-zero with one line matching `pattern` on stderr, and no result with tokens."""
    code, _, stderr = outcome
    assert code != 0, stderr
    assert "Traceback" not in stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("error: ") and re.search(pattern, stderr), stderr
    for result in results.glob("*/result.json"):
        assert not json.loads(result.read_text()).get("generated"), result


def test_truncated_expert_file(model, tmp_path):
    experts = pack_paths(model)["experts"]
    index = index_of(model)
    os.truncate(experts, experts.stat().st_size - 1000)
    last = max(index.entries, key=lambda e: e.offset)
    assert_fails_naming(
        run_model(model, tmp_path / "results"),
        tmp_path / "results",
        rf"{re.escape(str(experts))}: layer {last.layer} expert {last.expert} at offset {last.offset} lies beyond",
    )


def test_one_flipped_byte(model, tmp_path):
    experts = pack_paths(model)["experts"]
    entry = index_of(model).entry(1, 3)
    flip(experts, entry.offset + 777)
    assert_fails_naming(
        run_model(model, tmp_path / "results"),
        tmp_path / "results",
        rf"{re.escape(str(experts))}: layer 1 expert 3 at offset {entry.offset} fails its checksum",
    )


def test_every_byte_flipped(model, tmp_path):
    experts = pack_paths(model)["experts"]
    data = experts.read_bytes()
    experts.write_bytes(bytes(b ^ 0xFF for b in data))
    assert_fails_naming(
        run_model(model, tmp_path / "results"),
        tmp_path / "results",
        rf"{re.escape(str(experts))}: layer 0 expert 0 at offset 0 fails its checksum",
    )


@pytest.mark.parametrize("swapped", [("offset",), ("layer", "expert")])
def test_swapped_index_entries(model, tmp_path, swapped):
    """Swapping the offsets of two entries, or their keys (offset and checksum move together), fails."""
    index_path = pack_paths(model)["index"]
    data = json.loads(index_path.read_text())
    a, b = data["entries"][1], data["entries"][2]  # layer 0, experts 1 and 2
    for field in swapped:
        a[field], b[field] = b[field], a[field]
    index_path.write_text(json.dumps(data))
    stride = data["stride_bytes"]
    # Verified in file order: the blob at offset `stride` (expert 1's bytes) is now read as expert 2.
    assert_fails_naming(
        run_model(model, tmp_path / "results"),
        tmp_path / "results",
        rf"layer 0 expert 2 at offset {stride} fails its checksum",
    )


def test_corrupted_ssd_copy(model, tmp_path):
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    index = index_of(model)
    copy = place_expert_file(index, pack_paths(model), str(ssd), model_name(model))
    assert copy.parent.parent == ssd / "harness-experts"
    assert copy.read_bytes() == pack_paths(model)["experts"].read_bytes()
    entry = index.entry(0, 6)
    flip(copy, entry.offset + 5)
    assert_fails_naming(
        run_model(model, tmp_path / "results", "--ssd", str(ssd)),
        tmp_path / "results",
        rf"{re.escape(str(copy))}: layer 0 expert 6 at offset {entry.offset} fails its checksum.*delete",
    )


def test_every_read_is_verified(model):
    """A file damaged after its whole-file check still fails at the read: O_DIRECT reads and the
    memory-mapped tier of fiddler/daop."""
    paths = pack_paths(model)
    index = index_of(model)
    verify_expert_file(paths["experts"], index)
    entry = index.entry(1, 5)
    flip(paths["experts"], entry.offset + index.expert_bytes - 1)
    buffer = IoBuffer(index.stride_bytes)
    reader = ExpertReader(paths["experts"], index)
    try:
        reader.read_into((1, 4), buffer.view)  # an intact expert reads fine
        with pytest.raises(HarnessError, match=rf"layer 1 expert 5 at offset {entry.offset} fails its checksum"):
            reader.read_into((1, 5), buffer.view)
        book = ExpertCacheBook(index.moe_layers, 1, "per-layer", StaticPlacement)
        mapped = MappedExperts(index, reader, paths["experts"], book)
        mapped.mapped((1, 4))
        with pytest.raises(HarnessError, match=rf"layer 1 expert 5 at offset {entry.offset} fails its checksum"):
            mapped.mapped((1, 5))
        mapped.close()
    finally:
        reader.close()


def test_model_pack_repacks_a_corrupted_pack(model, caplog):
    experts = pack_paths(model)["experts"]
    intact = experts.read_bytes()
    flip(experts, index_of(model).entry(0, 2).offset)
    with caplog.at_level(logging.WARNING, logger="harness.models.packer"):
        code, stdout, stderr = run_cli("model", "pack", str(model))
    assert code == 0, stderr
    assert "re-packing: the existing pack fails verification" in caplog.text and "layer 0 expert 2" in caplog.text
    assert stdout.strip().startswith("packed and verified")
    assert experts.read_bytes() == intact


def test_old_format_pack_is_repacked(model):
    index_path = pack_paths(model)["index"]
    data = json.loads(index_path.read_text())
    data["format_version"] = 1
    index_path.write_text(json.dumps(data))
    with pytest.raises(HarnessError, match="store format 1"):
        PackIndex.load(index_path)
    _, wrote = pack_model(model)
    assert wrote and index_of(model).format_version == 2


@pytest.mark.parametrize(("field", "value"), [("hidden_size", 128), ("num_experts", 16), ("vocab_size", 2048)])
def test_config_changed_after_packing(model, tmp_path, field, value):
    config_path = model / "config.json"
    config = json.loads(config_path.read_text())
    before = config[field]
    config[field] = value
    config_path.write_text(json.dumps(config))
    pattern = rf"config\.json changed after packing: {field} {value} \(packed with {before}\)"
    assert_fails_naming(run_model(model, tmp_path / "results"), tmp_path / "results", pattern)
    code, _, stderr = run_cli("model", "pack", str(model))
    assert code == 2 and len(stderr.splitlines()) == 1 and re.search(pattern, stderr), stderr
    # Forced: the packer refuses expert shapes the config contradicts; the run, non-expert ones.
    code, _, stderr = run_cli("model", "pack", "--force", str(model))
    assert code in (0, 2) and len(stderr.splitlines()) == int(code == 2), stderr
    assert_fails_naming(run_model(model, tmp_path / "results"), tmp_path / "results", "config.json|implies|incomplete")


def tree_state(root: Path) -> dict[str, tuple[int, int, int]]:
    return {
        str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns, p.lstat().st_mode)
        for p in sorted(root.rglob("*"))
    }


def test_read_only_hugging_face_cache(packed, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    repo = hub / "models--some-org--tiny-moe"
    sha = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for f in packed.iterdir():
        if f.is_file():
            shutil.copy2(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    for p in [hub, *hub.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "harness-cache"))
    before = tree_state(hub)
    try:
        model_dir = resolve_model_dir("some-org/tiny-moe")
        assert model_dir == snapshot and model_name(model_dir) == "some-org/tiny-moe"
        assert pack_dir(model_dir) == tmp_path / "harness-cache" / "packed" / "models--some-org--tiny-moe" / sha
        code, _, stderr = run_model("some-org/tiny-moe", tmp_path / "results")
        assert code in (0, 3), stderr  # ok, or INVALID (too few decode steps to measure)
        (result,) = (tmp_path / "results").glob("*/result.json")
        assert json.loads(result.read_text())["generated"][0]["token_ids"]
        assert pack_paths(model_dir)["experts"].is_file()
        assert tree_state(hub) == before
    finally:
        for p in [hub, *hub.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_read_only_model_folder_packs_into_the_harness_cache(packed, tmp_path, monkeypatch):
    folder = tmp_path / "ro-model"
    folder.mkdir()
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "harness-cache"))
    # Root ignores permission bits, so "not writable" is what os.access says.
    monkeypatch.setattr(locate.os, "access", lambda path, mode: False)
    where = pack_dir(folder)
    assert where.parent == tmp_path / "harness-cache" / "packed" and where.name.startswith("ro-model-")
    assert pack_dir(packed) == packed / "packed"  # a folder with its pack beside it keeps it


def test_pack_content_hashes(model):
    hashes = pack_content_hashes(model)
    index = index_of(model)
    assert hashes["experts"] == index.experts_digest() and hashes["dense"] == index.dense_xxh3
    assert set(hashes) == {"experts", "dense", "tokenizer", "config"}
    assert all(re.fullmatch(r"[0-9a-f]{32}", h) for h in hashes.values())
    tokenizer = next(model.glob("tokenizer*.json"))
    tokenizer.write_text(tokenizer.read_text() + " ")
    changed = pack_content_hashes(model)
    assert changed["tokenizer"] != hashes["tokenizer"]
    assert [changed[k] == hashes[k] for k in ("experts", "dense", "config")] == [True, True, True]
