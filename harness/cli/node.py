"""`harness node start`: join this machine to a Ray cluster, advertising its SSD folders, disks and GPUs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import click

from harness.errors import HarnessError


@click.group("node")
def node_group() -> None:
    """Cluster nodes (Ray): join a machine so sweeps place cells on the node that owns their SSD."""


@node_group.command("start")
@click.option("--address", default=None, help="HEAD:PORT of the cluster to join; none: start a head here.")
@click.option(
    "--ssd", "ssd_folders", multiple=True, type=click.Path(path_type=Path), help="SSD folder to offer (repeatable)."
)
@click.option("--dry-run", is_flag=True, help="Print the resources and the `ray start` command; start nothing.")
def node_start(address: str | None, ssd_folders: tuple[Path, ...], dry_run: bool) -> None:
    """Start Ray on this machine with a resource per SSD folder and block device, the GPU kind, one measuring slot."""
    from harness.cluster import require_ray
    from harness.cluster.resources import node_resources
    from harness.results import gpu_info

    require_ray()
    gpus = [str(g.get("name")) for g in (gpu_info().get("gpus") or [])]
    resources = node_resources([str(p) for p in ssd_folders], gpus)
    ray_cli = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    command = [ray_cli, "start", f"--resources={json.dumps(resources)}"]
    command += [f"--address={address}"] if address else ["--head"]
    for folder in ssd_folders:
        click.echo(f"offers {folder.resolve()}")
    click.echo(f"resources: {json.dumps(resources)}")
    if dry_run:
        click.echo(" ".join(command))
        return
    code = subprocess.call(command)
    if code != 0:
        raise HarnessError(f"`ray start` failed with exit status {code}")


commands: list[click.Command] = [node_group]
