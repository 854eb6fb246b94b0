"""A sweep cell for the Ray tests: `cluster_cell.py SPEC.json RESULTS_DIR` runs tests/fake_cell.py, except for the
policy `fake-kill-worker`, which kills its parent (the Ray worker running the cell) in the middle of the cell."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import fake_cell

if __name__ == "__main__":
    if json.loads(Path(sys.argv[1]).read_text())["policy"] == "fake-kill-worker":
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(2)
        sys.exit(1)
    sys.exit(fake_cell.main(sys.argv[1], sys.argv[2]))
