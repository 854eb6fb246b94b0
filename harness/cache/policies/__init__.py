"""Built-in policies, one per module; importing this package registers them all."""

from harness.cache.policies import lfu, lru  # noqa: F401
