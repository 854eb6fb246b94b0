"""Sweep axes of the memory hierarchy (issue 12): `tiers` and `device` are matrix keys, and exclude rules drop a
combination the run spec refuses before it is validated."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harness.errors import HarnessError
from harness.sweep import SPEC_FIELDS, expand, load_sweep


def _sweep(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_tiers_and_device_are_sweep_axes(tmp_path):
    assert "tiers" in SPEC_FIELDS and "device" in SPEC_FIELDS
    sweep = load_sweep(
        _sweep(
            tmp_path,
            {
                "base": {"model": "models/m"},
                "matrix": {"device": ["cpu", "auto"], "tiers": ["host:lru:8", "host:lru:8,pagecache:64"]},
            },
        )
    )
    assert sweep.matrix["tiers"] == ["host:lru:8", "host:lru:8,pagecache:64"]
    devices = expand(load_sweep(_sweep(tmp_path, {"base": {"model": "m"}, "matrix": {"device": ["cpu", "auto"]}})))
    assert [c.spec.device for c in devices] == ["cpu", "auto"]


def test_exclude_drops_a_refused_combination_before_validation(tmp_path):
    body = {"base": {"model": "m"}, "matrix": {"max_prompts": [0, 2], "max_new_tokens": [8, 16]}}
    with pytest.raises(HarnessError, match="max_prompts=0"):
        expand(load_sweep(_sweep(tmp_path, body)))  # 0 prompts is refused by RunSpec
    cells = expand(load_sweep(_sweep(tmp_path, {**body, "exclude": [{"max_prompts": 0}]})))
    assert [(c.spec.max_prompts, c.spec.max_new_tokens) for c in cells] == [(2, 8), (2, 16)]
    # A rule on a default (not written in the cell) still matches the validated spec.
    dropped = expand(load_sweep(_sweep(tmp_path, {**body, "exclude": [{"max_prompts": 0}, {"policy": "lru"}]})))
    assert dropped == []
