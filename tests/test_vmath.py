"""The vectorisable float32 exp and log (`harness.cache.vmath`) against the correctly rounded values, over their
domains."""

import math

import numpy as np

from harness.cache.vmath import expf, logf


def test_expf_is_within_one_ulp_of_exp_and_clamps():
    # The SiLU's float32 exp against numpy's float64 exp rounded to float32 (the correctly rounded value), over
    # its whole range [-87, 88]; beyond it, the value at the bound.
    t = np.concatenate([np.linspace(-87, 88, 40001), np.linspace(-1, 1, 2001)]).astype(np.float32)
    got = np.array([expf(v) for v in t], dtype=np.float32)
    correct = np.exp(t.astype(np.float64)).astype(np.float32)
    assert np.abs(got.view(np.int32) - correct.view(np.int32)).max() <= 1
    assert expf(np.float32(1e30)) == expf(np.float32(88.0)) and expf(np.float32(-1e30)) == expf(np.float32(-87.0))
    assert expf(np.float32(0.0)) == 1.0


def test_logf_is_within_one_ulp_of_log():
    # Against numpy's float64 log rounded to float32 (the correctly rounded value, but for float64's own
    # rounding). Its callers' domain starts at 0.5 (a decayed count plus 0.5); every positive normal float32 is
    # in it: the range 0.5-4, random values over the whole exponent range, both sides of sqrt(2) (where the
    # reduction switches) and powers of 2.
    rng = np.random.default_rng(1)
    x = np.concatenate(
        [
            np.linspace(0.5, 4.0, 20001),
            np.exp(rng.uniform(-87, 88, 20000)),
            np.nextafter(np.float32(math.sqrt(2)), np.array([0.0, 4.0], dtype=np.float32)),
            2.0 ** np.arange(-126, 128),
        ]
    ).astype(np.float32)
    got = np.array([logf(v) for v in x], dtype=np.float32)
    correct = np.log(x.astype(np.float64)).astype(np.float32)
    assert np.array_equal(np.sign(got), np.sign(correct))
    assert np.abs(np.abs(got).view(np.int32) - np.abs(correct).view(np.int32)).max() <= 1
    assert logf(np.float32(1.0)) == 0.0 and logf(np.float32(2.0)) == np.float32(math.log(2.0))
