"""The vectorisable exp and log (`harness.cache.vmath`) against the correctly rounded values, over their domains."""

import math

import numpy as np

from harness.cache.vmath import EXP64_LIMIT, exp64, expf, log64


def ulps(got: np.ndarray, correct: np.ndarray) -> int:
    """The largest distance in units in the last place (same sign, so the bit patterns are ordered)."""
    return int(np.abs(got.view(np.int64) - correct.view(np.int64)).max())


def test_expf_is_within_one_ulp_of_exp_and_clamps():
    # The SiLU's float32 exp against numpy's float64 exp rounded to float32 (the correctly rounded value), over
    # its whole range [-87, 88]; beyond it, the value at the bound.
    t = np.concatenate([np.linspace(-87, 88, 40001), np.linspace(-1, 1, 2001)]).astype(np.float32)
    got = np.array([expf(v) for v in t], dtype=np.float32)
    correct = np.exp(t.astype(np.float64)).astype(np.float32)
    assert np.abs(got.view(np.int32) - correct.view(np.int32)).max() <= 1
    assert expf(np.float32(1e30)) == expf(np.float32(88.0)) and expf(np.float32(-1e30)) == expf(np.float32(-87.0))
    assert expf(np.float32(0.0)) == 1.0


def test_exp64_is_within_two_ulp_of_libm_and_clamps():
    rng = np.random.default_rng(0)
    t = np.concatenate([np.linspace(-EXP64_LIMIT, EXP64_LIMIT, 20001), rng.uniform(-1, 1, 20000), [0.0, 1e-300]])
    got = np.array([exp64(v) for v in t])
    assert ulps(got, np.array([math.exp(v) for v in t])) <= 2
    assert exp64(0.0) == 1.0
    assert exp64(-math.inf) == exp64(-EXP64_LIMIT) > 0 and exp64(math.inf) == exp64(EXP64_LIMIT) < math.inf


def test_log64_is_within_two_ulp_of_libm():
    # Its callers' domain starts at 0.5 (a decayed count plus 0.5); every positive normal float is in it.
    rng = np.random.default_rng(1)
    x = np.concatenate(
        [
            np.linspace(0.5, 4.0, 20001),
            np.exp(rng.uniform(-700, 700, 20000)),
            np.nextafter(math.sqrt(2), [0.0, 4.0]),
            [1.0, 2.0, 0.5, 1e-300, 1e300],
        ]
    )
    got = np.array([log64(v) for v in x])
    assert ulps(np.abs(got), np.abs(np.log(x))) <= 2 and np.array_equal(np.sign(got), np.sign(np.log(x)))
    assert log64(1.0) == 0.0 and log64(2.0) == math.log(2.0)
