"""The one exception type for bad input, and the exit statuses every command shares.

The CLI turns a HarnessError into a one-line message and exit status 2 (`ExitCode.BAD_INPUT`).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit statuses of every `harness` command; documented in `harness --help` and the README."""

    OK = 0
    """Ran, and every result is valid."""
    BAD_INPUT = 2
    """Refused before measuring: bad option, missing or corrupt input (one-line error on stderr)."""
    INVALID = 3
    """Ran and wrote its result, but the validity verdict is INVALID (reasons in the result)."""
    FAILED = 4
    """Started but did not complete (a failed run, or a sweep with a failed cell); failure recorded."""
    INTERRUPTED = 130
    """Stopped by SIGINT/SIGTERM; children stopped, partial files removed."""


class HarnessError(Exception):
    """A user-facing error: bad input, missing file, refused configuration.

    The message must say what is wrong and, where possible, what to do instead, in one line.
    """
