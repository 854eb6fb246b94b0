"""Parsing and formatting of sizes, durations and percentages given on the command line or in specs."""

from __future__ import annotations

import re

from harness.errors import HarnessError

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_size(text: str | int) -> int:
    """'2GiB' -> 2147483648, '4KiB' -> 4096, '1.5GB' -> 1500000000, 123 -> 123 (bytes)."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise HarnessError(f"cannot read size {text!r}: use a number with a unit such as 512MiB, 2GiB or 4KiB")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(text: str | float) -> float:
    """'5s' -> 5.0, '250ms' -> 0.25, '2min' -> 120.0 (seconds)."""
    if isinstance(text, int | float):
        return float(text)
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _TIME_UNITS:
        raise HarnessError(f"cannot read duration {text!r}: use a number with s, ms or min, e.g. 5s")
    return float(match.group(1)) * _TIME_UNITS[unit]


def format_bytes(n: float) -> str:
    """Binary-prefixed human form: 3221225472 -> '3.00 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
