"""Sweeps and simulation grids on a local Ray cluster of two nodes (two fake machines with different SSD folders)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from harness.results import read_json
from harness.sweep import SweepRunner, expand, load_sweep

ray = pytest.importorskip("ray", reason="needs the cluster extra: pip install 'harness[cluster]'")
from ray.cluster_utils import Cluster  # noqa: E402

from harness.cluster.resources import node_resources, ssd_resource  # noqa: E402
from harness.cluster.simulate import ray_grid  # noqa: E402
from harness.cluster.sweep import RayCells  # noqa: E402
from harness.trace.simulate import run_simulation  # noqa: E402

pytestmark = pytest.mark.slow  # a two-node Ray cluster takes about 20 s to start on a small machine

CELL = [sys.executable, str(Path(__file__).with_name("cluster_cell.py")), "{spec}", "{results}"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    """A head node owning SSD folder a/ and a second node owning b/, each with one measuring slot."""
    root = tmp_path_factory.mktemp("lab")
    ssd_a, ssd_b = root / "ssd-a", root / "ssd-b"
    ssd_a.mkdir()
    ssd_b.mkdir()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": node_resources([str(ssd_a)]), "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1, resources=node_resources([str(ssd_b)]))
    cluster.wait_for_nodes()
    yield {"root": root, "cluster": cluster, "ssd": (ssd_a, ssd_b)}
    ray.shutdown()
    cluster.shutdown()


def _sweep(root: Path, ssd_a: Path, ssd_b: Path, kill: bool) -> Path:
    spec = {
        "base": {"model": "models/fake"},
        "matrix": {"ssd": [str(ssd_a), str(ssd_b)], "policy": ["lru", "lfu", *(["fake-kill-worker"] if kill else [])]},
        "exclude": [{"ssd": str(ssd_b), "policy": "fake-kill-worker"}] if kill else [],
        "drop_caches": False,
    }
    path = root / ("kill.yaml" if kill else "plain.yaml")
    path.write_text(yaml.safe_dump(spec))
    return path


def _owner(folder: str) -> str:
    """The id of the node that advertises `folder`."""
    (owner,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and ssd_resource(folder) in n["Resources"]]
    return owner


def _hits_and_bytes(results: Path, run_id: str) -> tuple:
    metrics = read_json(results / run_id / "result.json")["metrics"]
    return metrics["hits"], metrics["ssd_read_bytes"]


def test_cells_land_on_their_ssd_node_and_equal_a_serial_run(lab):
    root, (ssd_a, ssd_b) = lab["root"], lab["ssd"]
    sweep = load_sweep(_sweep(root, ssd_a, ssd_b, kill=True))
    cells = expand(sweep)
    outcomes = SweepRunner(sweep, root / "cluster", command=CELL, executor=RayCells(lab["cluster"].address)).run(cells)
    status = {o.cell.spec.policy + "@" + Path(o.cell.spec.ssd).name: o.status for o in outcomes}
    assert status == {"lru@ssd-a": "ok", "lfu@ssd-a": "ok", "lru@ssd-b": "ok", "lfu@ssd-b": "ok"} | {
        "fake-kill-worker@ssd-a": "failed"
    }
    killed = next(o for o in outcomes if o.cell.spec.policy == "fake-kill-worker")
    assert "Ray task died" in killed.reason
    assert read_json(root / "cluster" / killed.cell.run_id / "result.json")["status"] == "failed"
    ok = [o.cell for o in outcomes if o.status == "ok"]
    for cell in ok:
        record = read_json(root / "cluster" / cell.run_id / "sweep.json")
        assert record["node"]["node_id"] == _owner(cell.spec.ssd)  # ran on the node that owns the folder
    serial = SweepRunner(sweep, root / "serial", command=CELL).run(ok)
    assert all(o.status == "ok" for o in serial)
    for cell in ok:
        assert _hits_and_bytes(root / "cluster", cell.run_id) == _hits_and_bytes(root / "serial", cell.run_id)
    # Resume: everything done (failed included) is skipped.
    again = SweepRunner(sweep, root / "cluster", command=CELL, executor=RayCells(lab["cluster"].address)).run(cells)
    assert {o.status for o in again} == {"skipped"}


def test_simulation_grid_equals_the_serial_one(lab):
    traces = sorted((lab["root"] / "serial").rglob("trace.parquet"))
    if not traces:  # the sweep test did not run first (e.g. -k): make one trace
        test_cells_land_on_their_ssd_node_and_equal_a_serial_run(lab)
        traces = sorted((lab["root"] / "serial").rglob("trace.parquet"))
    args = (traces[0], ["lru", "lfu", "arc"], "1,2,4")
    serial = run_simulation(*args)
    grid = run_simulation(*args, grid=ray_grid(lab["cluster"].address))
    assert len(grid.results) == len(serial.results) == 18  # 3 policies + 3 oracles, x 3 capacities
    for a, b in zip(serial.results, grid.results, strict=True):
        assert (a.policy, a.capacity_slots, a.counts, a.tokens) == (b.policy, b.capacity_slots, b.counts, b.tokens)
