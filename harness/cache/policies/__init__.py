"""Built-in policies, one per module; importing this package registers them all."""

from harness.cache.policies import (  # noqa: F401
    arc,
    belady,
    flashmoe,
    fwlru,
    layered,
    lecar,
    lfu,
    lrfu,
    lrfu_admit,
    lrfu_prior,
    lru,
    random_policy,
    reuse_logit,
    s3fifo,
    sieve,
    static,
)
