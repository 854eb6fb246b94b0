"""Shared fixtures: tiny random-init checkpoints of every supported architecture, created once per session."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.models.archs import SUPPORTED as ARCHS
from harness.paths import harness_cache_dir

# The compiled policies' cache (`harness.cache.jit`) is under HARNESS_CACHE, which each test points at a
# temporary folder: the CLI subprocesses the tests start keep the session's one cache instead of compiling
# every policy again.
os.environ.setdefault("NUMBA_CACHE_DIR", str(harness_cache_dir() / "numba"))

__all__ = ["ARCHS"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_model("olmoe")` -> folder of a packed tiny checkpoint of that architecture (cached)."""
    from harness.models.factory import create_model
    from harness.models.packer import pack_model

    made: dict[str, Path] = {}

    def get(arch: str = "olmoe") -> Path:
        if arch not in made:
            out = tmp_path_factory.mktemp("models") / f"tiny-{arch}"
            create_model(arch, "tiny", out, seed=0)
            pack_model(out)
            made[arch] = out
        return made[arch]

    return get


@pytest.fixture(autouse=True)
def _harness_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs cache their measured compute time under HARNESS_CACHE: keep tests out of ~/.cache."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path_factory.getbasetemp() / "harness-cache"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` need CUDA: skipped, saying why, where torch sees no CUDA device."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    cuda = torch.version.cuda
    why = "this torch build has no CUDA" if cuda is None else f"torch built for CUDA {cuda} sees no GPU"
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: {why} (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)
