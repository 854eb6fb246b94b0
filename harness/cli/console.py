"""Human-readable output: rich consoles that keep tables whole when the output is piped or logged.

rich squeezes a table into 80 columns when its stream is not a terminal, and `make bench | tee`,
CI logs and `> file` are read by people too: cell labels wrapped into `model=…` lines say nothing.
"""

from __future__ import annotations

import sys

from rich.console import Console

PIPED_WIDTH = 200
"""Columns of a console whose stream is not a terminal (a terminal keeps its own width)."""


def make_console(stderr: bool = False, quiet: bool = False) -> Console:
    """A console on stdout (or stderr), as wide as the terminal, or `PIPED_WIDTH` when piped."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, quiet=quiet, width=None if stream.isatty() else PIPED_WIDTH)
