"""Wraps a sweep cell's command for tests: `cell_wrapper.py LOG HOLD_DIR RUN_ID -- COMMAND...`.

Appends RUN_ID to LOG (one line per start), waits while HOLD_DIR/RUN_ID exists (so a test can
interrupt the sweep at a known cell, deterministically), then execs COMMAND.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# How often a held cell looks for its hold file to go away (seconds).
POLL_S = 0.05


def main(argv: list[str]) -> None:
    log, hold_dir, run_id, sep, *command = argv
    if sep != "--" or not command:
        raise SystemExit("usage: cell_wrapper.py LOG HOLD_DIR RUN_ID -- COMMAND...")
    with open(log, "a") as handle:
        handle.write(run_id + "\n")
    hold = Path(hold_dir) / run_id
    while hold.exists():
        time.sleep(POLL_S)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
