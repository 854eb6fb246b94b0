"""One parser for sizes and one for capacities: the conventions of harness.units, and what they refuse."""

from __future__ import annotations

import pytest

from harness.errors import HarnessError
from harness.units import parse_capacities, parse_capacity, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4KiB", 4096),
        ("4kib", 4096),
        ("2GiB", 2 * 2**30),
        ("1.5GiB", 3 * 2**29),
        ("1TiB", 2**40),
        ("1EiB", 2**60),
        # fio's convention: a bare letter is a power of 1024.
        ("4k", 4096),
        ("4K", 4096),
        ("3m", 3 * 2**20),
        ("2g", 2 * 2**30),
        ("1t", 2**40),
        ("512", 512),
        ("512B", 512),
        (" 64 MiB ", 64 * 2**20),
        ("1e9", 10**9),
        (".5KiB", 512),
        ("0", 0),
        (4096, 4096),
    ],
)
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("2GB", "ambiguous"),
        ("5kB", "ambiguous"),
        ("1TB", "write TiB for powers of 1024, or the bytes as a number for powers of 1000 (1TB = 1000000000000)"),
        ("-1GiB", "negative"),
        (-5, "negative"),
        ("nan", "cannot read size"),
        ("inf", "cannot read size"),
        ("NaNGiB", "cannot read size"),
        ("1e30", "beyond 1 EiB"),
        ("5000000TiB", "beyond 1 EiB"),
        ("2EiB", "beyond 1 EiB"),
        (2**61, "beyond 1 EiB"),
        ("lots", "cannot read size 'lots'"),
        ("4 KiBs", "cannot read size"),
        ("", "cannot read size"),
        ("1x", "cannot read size"),
    ],
)
def test_sizes_refused(text, needle):
    with pytest.raises(HarnessError) as caught:
        parse_size(text)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_durations():
    assert parse_duration("250ms") == 0.25
    assert parse_duration("2min") == 120.0
    assert parse_duration(3) == 3.0
    for bad in ("-1s", "nan", float("nan"), float("inf"), "soon"):
        with pytest.raises(HarnessError):
            parse_duration(bad)


def test_capacities():
    assert parse_capacity("16", 64) == 16
    assert parse_capacity("25%", 64) == 16
    assert parse_capacity("12.5%", 64) == 8
    assert parse_capacities("12.5%,25%,50%", 64) == [8, 16, 32]
    assert parse_capacities("10%:30%:10%", 10) == [1, 2, 3]
    assert parse_capacities("10%:90%:10%", 10) == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert parse_capacities("4:16:4", 64) == [4, 8, 12, 16]
    assert parse_capacities("4, 2", 10) == [2, 4]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("lots", "cannot read capacity 'lots'"),
        ("-4", "cannot read capacity '-4'"),
        ("-25%", "cannot read capacity '-25%'"),
        ("nan%", "cannot read capacity 'nan%'"),
        ("inf", "cannot read capacity 'inf'"),
        ("2.5", "cannot read capacity '2.5'"),
        ("150%", "more than 100%"),
        ("0.5%", "fewer than 1 slot"),
        ("0", "fewer than 1 slot"),
        ("10%:90%", "start:stop:step"),
        ("10%:90:10%", "all shares or all counts"),
        ("10%:90%:0%", "positive step"),
        ("90%:10%:10%", "stop >= start"),
        (",", "no capacity given"),
    ],
)
def test_capacities_refused(text, needle):
    with pytest.raises(HarnessError) as caught:
        parse_capacities(text, 64)
    assert needle in str(caught.value)
