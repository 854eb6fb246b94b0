"""Machine-readable output of the commands' `--json` flag: one JSON document on stdout, nothing else."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import click


def _plain(value: Any) -> Any:
    """Dataclasses, paths, tuples and numpy scalars as JSON values; NaN and infinities (not JSON) as null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_plain(v) for v in value]
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return _plain(value.item())  # a numpy scalar (numpy itself is not imported: the CLI starts light)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def echo_json(data: Any) -> None:
    """Print `data` as strict JSON (no NaN) on stdout."""
    click.echo(json.dumps(_plain(data), indent=2, allow_nan=False, default=str))
