"""Simulation grids on Ray: the prepared trace goes into the object store once; each (policy, capacity) is a task.

Every task runs `harness.trace.simulate.run_replay`, the function the serial grid runs, on the same
replay, so the hits and misses are identical to a serial `harness simulate`; results come back in the
order of the cells. A policy that reads a file (flashmoe:PATH) needs that path on every node.
"""

from __future__ import annotations

from harness.cache.profile import FrequencyProfile
from harness.cluster import connect
from harness.keys import Scope
from harness.trace.simulate import Grid, Replay, SimulationResult, run_replay


def ray_grid(address: str) -> Grid:
    """A `Grid` for `run_simulation` that replays the cells as Ray tasks of the cluster at `address`."""
    ray = connect(address)
    task = ray.remote(max_retries=1)(run_replay)

    def grid(
        replay: Replay, cells: list[tuple[str, int]], scope: Scope, seed: int, profile: FrequencyProfile | None
    ) -> list[SimulationResult]:
        shared = ray.put(replay)
        return ray.get([task.remote(shared, spec, capacity, scope, seed, profile=profile) for spec, capacity in cells])

    return grid
