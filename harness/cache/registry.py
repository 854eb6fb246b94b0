"""Policy registry: one decorator in the file that defines a policy; look-up by name with a clear error."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from harness.cache.base import CachePolicy
from harness.errors import HarnessError

_POLICIES: dict[str, type[CachePolicy]] = {}
P = TypeVar("P", bound=type[CachePolicy])


def register_policy(cls: P) -> P:
    """Class decorator: make `cls` selectable by its `name`."""
    if cls.name in _POLICIES:
        raise ValueError(f"policy name {cls.name!r} registered twice")
    _POLICIES[cls.name] = cls
    return cls


def _load_builtin() -> None:
    # Importing the package registers every built-in policy (each file decorates its class).
    import harness.cache.policies  # noqa: F401


def policy_names() -> list[str]:
    _load_builtin()
    return sorted(_POLICIES)


def policy_class(spec: str) -> type[CachePolicy]:
    """The class for 'name' or 'name:argument' (e.g. 'lfu-window:64', 'flashmoe:model.pt')."""
    _load_builtin()
    name = spec.split(":", 1)[0].strip().lower()
    if name not in _POLICIES:
        raise HarnessError(f"unknown policy {name!r}; known policies: {', '.join(policy_names())}")
    return _POLICIES[name]


def policy_factory(spec: str, seed: int = 0, **context: object) -> Callable[[int], CachePolicy]:
    """A constructor `capacity -> policy` for the spec; `context` carries e.g. the trace for oracles."""
    cls = policy_class(spec)
    argument = spec.split(":", 1)[1] if ":" in spec else None

    def make(capacity: int) -> CachePolicy:
        builder = getattr(cls, "from_spec", None)
        if builder is not None:
            return builder(capacity=capacity, seed=seed, argument=argument, **context)
        if argument is not None:
            raise HarnessError(f"policy {cls.name!r} takes no argument (got {spec!r})")
        return cls(capacity, seed)

    return make
