"""`python -m harness` runs the CLI (used to start sweep cells and budgeted runs as child processes)."""

from harness.cli import main

main()
