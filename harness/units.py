"""Parsing and formatting of sizes, durations and cache capacities given on the command line or in specs.

Sizes: one convention everywhere, written once here.
- IEC suffixes are powers of 1024: `KiB`, `MiB`, `GiB`, `TiB`, `PiB`, `EiB` (any case: `gib` too).
- A bare letter is fio's convention, also powers of 1024: `4k` = 4 KiB, `2G` = 2 GiB.
- `B` or no suffix: bytes. `1e9` and `1.5GiB` are read exactly (decimal arithmetic, rounded to a byte).
- `kB`, `MB`, `GB`, `TB` are refused as ambiguous: SI reads them as powers of 1000, fio (its default
  `kb_base=1024`) as powers of 1024; the error says how to write either.
- Negative, NaN, infinite and sizes above `MAX_SIZE_BYTES` (1 EiB) are refused.

Capacities of an expert cache: a count of slots (`16`), a share of the experts a cache group holds
(`25%`), a list of either (`8,16` or `12.5%,25%`), or a range `10%:90%:10%` (start:stop:step, stop
included; all shares or all counts).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

from harness.errors import HarnessError

MAX_SIZE_BYTES = 2**60
"""1 EiB: far above any RAM or SSD a harness run meets; a larger size is a typo or a unit mix-up."""
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_QUANTITY_RE = re.compile(rf"^\s*([+-]?{_NUMBER})\s*([a-zA-Z]*)\s*$")
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "m": 60.0, "min": 60.0, "h": 3600.0}
_SIZE_HINT = "use a number with a unit such as 512MiB, 2GiB, 4KiB or fio's 4k (powers of 1024)"


def _size_multiplier(unit: str) -> int | None:
    """Bytes per unit, or None for a unit this parser does not know; raises for an ambiguous one."""
    lower = unit.lower()
    if lower in ("", "b"):
        return 1
    if len(lower) == 3 and lower.endswith("ib") and lower[0] in _POWERS:
        return 1024 ** _POWERS[lower[0]]
    if len(lower) == 1 and lower in _POWERS:
        return 1024 ** _POWERS[lower]
    if len(lower) == 2 and lower.endswith("b") and lower[0] in _POWERS:
        iec, si = f"{unit[0].upper()}iB", 1000 ** _POWERS[lower[0]]
        raise HarnessError(
            f"size unit {unit!r} is ambiguous (SI: powers of 1000, fio: powers of 1024): write {iec} for "
            f"powers of 1024, or the bytes as a number for powers of 1000 (1{unit} = {si})"
        )
    return None


def parse_size(text: str | int) -> int:
    """'2GiB' -> 2147483648, '4KiB' and '4k' -> 4096, '1e9' -> 1000000000, 123 -> 123 (bytes)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = Decimal(text)
    else:
        match = _QUANTITY_RE.match(str(text))
        multiplier = _size_multiplier(match.group(2)) if match else None
        if match is None or multiplier is None:
            raise HarnessError(f"cannot read size {text!r}: {_SIZE_HINT}")
        value = Decimal(match.group(1)) * multiplier
    if value < 0:
        raise HarnessError(f"size {text!r} is negative: {_SIZE_HINT}")
    if value > MAX_SIZE_BYTES:
        raise HarnessError(f"size {text!r} is beyond 1 EiB, more than any machine holds: {_SIZE_HINT}")
    return int(value.to_integral_value())


def parse_duration(text: str | float) -> float:
    """'5s' -> 5.0, '250ms' -> 0.25, '2min' -> 120.0 (seconds); negative, NaN and infinite are refused."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _QUANTITY_RE.match(str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _TIME_UNITS:
            raise HarnessError(f"cannot read duration {text!r}: use a number with s, ms or min, e.g. 5s")
        seconds = float(match.group(1)) * _TIME_UNITS[unit]
    if not math.isfinite(seconds) or seconds < 0:
        raise HarnessError(f"duration {text!r} must be a finite number of seconds, 0 or more, e.g. 5s")
    return seconds


def _capacity_number(text: str, what: str) -> tuple[Decimal, bool]:
    """('25%' -> (25, True)), ('16' -> (16, False)); anything else, negative included, is refused."""
    share = text.endswith("%")
    number = text[:-1].strip() if share else text
    if not re.fullmatch(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+", number) or (not share and "." in number):
        raise HarnessError(
            f"cannot read {what} {text!r}: use a count of slots (16), a share of the experts (25%) "
            "or a range (10%:90%:10%)"
        )
    value = Decimal(number)
    if share and value > 100:
        raise HarnessError(f"{what} {text!r} is more than 100% of the experts")
    return value, share


def _slots(value: Decimal, share: bool, whole: int) -> int:
    return round(value / 100 * whole) if share else int(value)


def parse_capacity(text: str, whole: int, what: str = "capacity") -> int:
    """Slots of one cache group holding at most `whole` experts: '16' -> 16, '25%' of 64 -> 16."""
    value, share = _capacity_number(text.strip(), what)
    return _slots(value, share, whole)


def parse_capacities(text: str, whole: int, what: str = "capacity") -> list[int]:
    """'12.5%,25%', '8,16' or '10%:90%:10%' -> sorted distinct slot counts, each at least 1."""
    slots: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if ":" not in part:
            slots.append(parse_capacity(part, whole, what))
            continue
        bounds = [_capacity_number(x.strip(), what) for x in part.split(":")]
        if len(bounds) != 3 or len({share for _, share in bounds}) != 1:
            raise HarnessError(f"cannot read {what} range {part!r}: use start:stop:step, all shares or all counts")
        (lo, share), (hi, _), (by, _) = bounds
        if by <= 0 or hi < lo:
            raise HarnessError(f"{what} range {part!r} needs a positive step and stop >= start")
        count = int((hi - lo) / by) + 1
        slots += [_slots(lo + i * by, share, whole) for i in range(count)]
    if not slots:
        raise HarnessError(f"no {what} given")
    if min(slots) < 1:
        raise HarnessError(f"{what} {text!r} gives fewer than 1 slot; the cache needs at least one slot")
    return sorted(set(slots))


def format_bytes(n: float) -> str:
    """Binary-prefixed human form: 3221225472 -> '3.00 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
