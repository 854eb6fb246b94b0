"""Doubly linked queues of keys over numpy arrays, for compiled policies (`harness.cache.compiled`): a queue's
ends and size are three int globals, a key's links three int columns of its row (which queue, the older and the
newer neighbour)."""

from __future__ import annotations

import numpy as np

from harness.cache.jit import KERNEL, njit

try:
    from numba import types
except ImportError:  # njit is the identity (harness.cache.jit)
    types = None  # type: ignore[assignment]

NONE = -1
"""No key (an empty queue end, a missing link); `WHERE` of a key in no queue."""
OLDEST, NEWEST, SIZE = 0, 1, 2
"""Offsets of a queue's ends and size within its three globals."""
QUEUE_LINK, OLDER_LINK, NEWER_LINK = 0, 1, 2
"""Offsets of a key's links from the first of its three link columns: which queue, the older and the newer
neighbour."""


@njit(types.none(types.int64[:], types.int64[:, :], types.int64, types.int64, types.int64) if types else None, **KERNEL)
def push(g: np.ndarray, ki: np.ndarray, q: int, key: int, links: int) -> None:
    """Append `key` at the newest end of queue `q`, whose links are the key columns `links` and the next two
    (which queue, older, newer); a key already in `q` keeps its place (as in a dict)."""
    if ki[key, links + QUEUE_LINK] == q:
        return
    newest = g[3 * q + NEWEST]
    ki[key, links + QUEUE_LINK], ki[key, links + OLDER_LINK], ki[key, links + NEWER_LINK] = q, newest, NONE
    if newest == NONE:
        g[3 * q + OLDEST] = key
    else:
        ki[newest, links + NEWER_LINK] = key
    g[3 * q + NEWEST] = key
    g[3 * q + SIZE] += 1


@njit(types.none(types.int64[:], types.int64[:, :], types.int64, types.int64) if types else None, **KERNEL)
def unlink(g: np.ndarray, ki: np.ndarray, key: int, links: int) -> None:
    """Take `key` out of its queue among those linked by the columns from `links`."""
    q, older, newer = ki[key, links + QUEUE_LINK], ki[key, links + OLDER_LINK], ki[key, links + NEWER_LINK]
    if older == NONE:
        g[3 * q + OLDEST] = newer
    else:
        ki[older, links + NEWER_LINK] = newer
    if newer == NONE:
        g[3 * q + NEWEST] = older
    else:
        ki[newer, links + OLDER_LINK] = older
    g[3 * q + SIZE] -= 1
    ki[key, links + QUEUE_LINK], ki[key, links + OLDER_LINK], ki[key, links + NEWER_LINK] = NONE, NONE, NONE


@njit(**KERNEL, inline="always")
def oldest_unmarked(g: np.ndarray, ki: np.ndarray, q: int, links: int, mark: np.ndarray, tag: int) -> int:
    """The oldest key of queue `q` whose mark is not `tag` (NONE: none): an LRU victim, where a step marks its
    own keys (just touched, so near the newest end: the walk rarely passes one)."""
    key = g[3 * q + OLDEST]
    while key != NONE and mark[key] == tag:
        key = ki[key, links + NEWER_LINK]
    return key


@njit(**KERNEL, inline="always")
def leave(g: np.ndarray, ki: np.ndarray, key: int, links: int) -> None:
    """`key` leaves the queue it is in, among those linked by the columns from `links` (if in one)."""
    if ki[key, links + QUEUE_LINK] != NONE:
        unlink(g, ki, key, links)


@njit(**KERNEL, inline="always")
def move_to_newest(g: np.ndarray, ki: np.ndarray, q: int, key: int, links: int) -> None:
    """`key` moves to (or joins) the newest end of queue `q`: a recency queue's touch."""
    leave(g, ki, key, links)
    push(g, ki, q, key, links)
