"""What a node advertises to Ray, and what a sweep cell asks for: custom resources with stable names.

A node that holds SSD folders advertises one resource per folder (and per block device under it);
a cell that names `ssd` asks for a sliver of that folder's resource, so Ray places it on the node
that owns the folder. Every node advertises one `harness_measure` slot and every measuring cell
takes it whole: one measuring cell per node at a time, as on a single machine. RAM is Ray's own
`memory` resource; a GPU is Ray's `GPU` plus a resource naming its kind.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from harness.errors import HarnessError
from harness.spec import RunSpec

MEASURE = "harness_measure"
"""One per node: the measuring cell holds it whole so that cells never share a node's SSD, CPU or page cache."""
_SLIVER = 0.001  # a placement constraint, not a capacity: any number of cells may name the same folder


def _token(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


def ssd_resource(path: str) -> str:
    """The resource a node that owns folder `path` advertises (a hash of the normalised absolute path)."""
    if not os.path.isabs(path):
        raise HarnessError(f"SSD folder {path!r} must be an absolute path to be placed on a cluster node")
    digest = hashlib.sha256(os.path.normpath(path).encode()).hexdigest()[:12]
    return f"harness_ssd_{digest}"


def disk_resource(disk: str) -> str:
    return f"harness_disk_{_token(disk)}"


def gpu_resource(name: str) -> str:
    return f"harness_gpu_{_token(name)}"


def node_resources(ssd_folders: list[str], gpu_names: list[str] | None = None) -> dict[str, float]:
    """The custom resources `harness node start` advertises for these folders and GPUs."""
    from harness.ssd.devices import block_device_for_path

    resources: dict[str, float] = {MEASURE: 1.0}
    for folder in ssd_folders:
        path = os.path.abspath(folder)
        if not os.path.isdir(path):
            raise HarnessError(f"SSD folder {folder} does not exist on this machine")
        resources[ssd_resource(path)] = 1.0
        disk = block_device_for_path(path)
        if disk:
            resources[disk_resource(disk)] = 1.0
    for name in gpu_names or []:
        resources[gpu_resource(name)] = resources.get(gpu_resource(name), 0.0) + 1.0
    return resources


def cell_requirements(spec: RunSpec) -> dict[str, Any]:
    """Ray task options for one measuring cell: the node's measuring slot, its SSD folder, a GPU for cuda cells."""
    resources = {MEASURE: 1.0}
    if spec.ssd:
        resources[ssd_resource(spec.ssd)] = _SLIVER
    options: dict[str, Any] = {"resources": resources, "num_cpus": 0}
    if spec.device == "cuda":
        options["num_gpus"] = 1
    return options
