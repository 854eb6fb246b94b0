"""Runtime strategies by name: plain cache, next-layer-gate prefetch, look-ahead before attention, Fiddler-style,
DAOP-style, on-demand.

Importing the package registers every built-in strategy (each module decorates its class)."""

from harness.runtime.strategies import cache, daop, fiddler, lookahead, ondemand, prefetch  # noqa: F401
from harness.runtime.strategies.base import (
    PEERS,
    CacheRequest,
    Strategy,
    check_strategy,
    make_strategy,
    strategy_names,
)

__all__ = ["PEERS", "CacheRequest", "Strategy", "check_strategy", "make_strategy", "strategy_names"]
