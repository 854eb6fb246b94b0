"""The `harness` command: a click group that parses and delegates; each family of commands has a module.

Command modules import nothing heavy (torch, transformers, pandas, pyarrow, matplotlib) at their top:
`harness --help`, `--version` and every `--help` start in well under a second; the work imports what it uses.
"""

from __future__ import annotations

import errno
import logging
import sys

import click

from harness import __version__
from harness.cli import model, node, predict, run, simulate, ssd, sweep
from harness.errors import HarnessError

_NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


class _Group(click.Group):
    """Turns HarnessError into one line on stderr and exit status 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except HarnessError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except OSError as exc:
            # A read-only or protected place to write (a model folder, a results disk): the user's to fix.
            if exc.errno not in _NOT_WRITABLE:
                raise
            click.echo(f"error: {exc.filename}: {exc.strerror} (a read-only or protected location)", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


_EXIT_CODES = """\b
Exit status (harness run, harness sweep):
  0    ok: ran, and every result is valid
  2    bad input: refused before measuring (one-line error)
  3    ran, but a result is INVALID (result written, reasons inside)
  4    failed: a run or a sweep cell did not complete (failure written)
  130  interrupted (SIGINT/SIGTERM): children stopped, partial files removed"""


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_EXIT_CODES)
@click.version_option(__version__, "--version", prog_name="harness", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """MoE offload harness: MoE inference with experts on an SSD, expert-cache policies, sweeps, reports."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


for _module in (model, run, ssd, simulate, sweep, predict, node):
    for _command in _module.commands:
        main.add_command(_command)
