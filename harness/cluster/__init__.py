"""Many machines on Ray: sweep cells on the node that owns their SSD, simulation grids as tasks.

Imported only under `--cluster` (and by `harness node`): without it, Ray is never imported.
"""

from __future__ import annotations

import logging
from types import ModuleType

from harness.errors import HarnessError

INSTALL_HINT = "install the cluster extra: pip install 'harness[cluster]'"


def require_ray() -> ModuleType:
    """The ray module, or a one-line HarnessError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise HarnessError(f"Ray is not installed: {INSTALL_HINT}") from None
    return ray


def connect(address: str) -> ModuleType:
    """Join the Ray cluster at `address` ('auto': RAY_ADDRESS or the cluster running on this machine)."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise HarnessError(f"cannot join the Ray cluster at {address!r}: {first}") from None
    return ray
