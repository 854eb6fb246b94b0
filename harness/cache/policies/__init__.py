"""Built-in policies, one per module; importing this package registers them all."""

from harness.cache.policies import arc, belady, flashmoe, lecar, lfu, lru, random_policy  # noqa: F401
