"""Branch-free exp and log that a compiled loop vectorises, for the learned policies' per-expert arithmetic.

numba has no vector math library here (no SVML): a loop calling `math.exp` or `math.log` makes one scalar libm
call per value, which was a third of `reuse-logit`'s replay time. These are plain arithmetic on the float's
bits, inlined into the loop, so that LLVM runs them 8 float32 lanes at a time (AVX2):
- `expf`: exp in float32 within 1 ulp (the FlashMoE network's SiLU, trained in float32; reuse-logit's sigmoid);
- `logf`: log in float32 within 1 ulp on its domain (reuse-logit's log-rates); tested against float64 log.

Each takes its argument reduction from Cody and Waite (a split constant whose high part multiplies exactly)
and a truncated series whose truncation error is below half an ulp; the coefficients are the series' own
(1/k!, 2/(2k+1)), not fitted ones.
"""

from __future__ import annotations

import math

import numpy as np

from harness.cache.jit import njit

try:
    from numba import types
except ImportError:  # njit is the identity (harness.cache.jit)
    types = None  # type: ignore[assignment]

_LN2 = math.log(2.0)
_LN2_HI = np.float32(_LN2 - _LN2 % 2.0**-12)
"""ln 2 to 12 bits, so that n * _LN2_HI is exact in float32 for every |n| < 2^12; _LN2_LO the rest."""
_LN2_LO = np.float32(_LN2 - float(_LN2_HI))
_INV_LN2 = np.float32(1.0 / _LN2)
_ROUND = np.float32(1.5 * 2.0**23)
"""Adding it to a float32 of magnitude below 2^22 rounds it to an integer, held in the low mantissa bits."""
_ROUND_BITS = int(_ROUND.view(np.int32))
_EXP_LOW, _EXP_HIGH = np.float32(-87.0), np.float32(88.0)
"""expf's input clamp: 2^n below stays a normal float32 (exp(88) = 1.7e38, exp(-87) = 1.7e-38)."""
_TAYLOR = tuple(np.float32(1.0 / math.factorial(k)) for k in range(8))


@njit(types.float32(types.float32) if types else None, cache=True, inline="always")
def expf(t: np.float32) -> np.float32:
    """exp(t) in float32 within 1 ulp. t = n ln2 + r with |r| <= ln2 / 2; exp(r) = 1 + q, q by the Taylor
    polynomial to degree 7 (truncation 5e-9 relative) in Estrin's form, 1 added last so that q's rounding errors
    count at q's scale; 2^n from the exponent bits. t is clamped to [-87, 88]."""
    t = np.float32(min(max(t, _EXP_LOW), _EXP_HIGH))
    k = t * _INV_LN2 + _ROUND
    n = k - _ROUND
    r = (t - n * _LN2_HI) - n * _LN2_LO
    c = _TAYLOR
    r2 = r * r
    q = r + r2 * (((c[2] + c[3] * r) + r2 * (c[4] + c[5] * r)) + (r2 * r2) * (c[6] + c[7] * r))
    two_n = np.int32((np.float32(k).view(np.int32) - _ROUND_BITS + 127) << 23).view(np.float32)
    return (np.float32(1.0) + q) * two_n


_SQRT2 = np.float32(math.sqrt(2.0))
_ONE, _TWO, _HALF = np.float32(1.0), np.float32(2.0), np.float32(0.5)
_MANTISSA, _ONE_BITS = (1 << 23) - 1, 127 << 23
_ATANH_TERMS = tuple(np.float32(2.0 / (2 * k + 1)) for k in range(1, 5))
"""2/3, 2/5, 2/7, 2/9: log m = 2 atanh(s) = 2 (s + s^3/3 + ... + s^9/9 + ...), s = (m - 1) / (m + 1), |s| <= 0.1716
for m in [sqrt(1/2), sqrt(2)): the terms past s^9 are below 3e-9 of the sum (float32's half ulp is 3e-8)."""


@njit(types.float32(types.float32) if types else None, cache=True, inline="always", error_model="numpy")
def logf(x: np.float32) -> np.float32:
    """log(x) in float32 within 1 ulp for a positive normal x (the callers' values are at least 0.5; zero,
    subnormals, infinities and NaN are outside its domain). x = 2^k m with m in [sqrt(1/2), sqrt(2)), k and m
    from the bits (AVX2 converts int32 to float32, 8 lanes); log m by the atanh series of s = (m - 1) / (m + 1)
    (`_ATANH_TERMS`) in Estrin's form, written as f - s (f - q) with f = m - 1 (exact) and q = 2 (s^2/3 + s^4/5 +
    ...): 2 s = f - s f, so only the small correction s (f - q) carries rounding errors; k ln 2 with ln 2 split as
    in `expf`."""
    bits = np.float32(x).view(np.int32)
    m = np.int32((bits & _MANTISSA) | _ONE_BITS).view(np.float32)  # x's mantissa, in [1, 2)
    k = np.float32((bits >> 23) - 127)  # x's exponent
    high = m > _SQRT2
    m = m * _HALF if high else m
    k = k + _ONE if high else k
    f = m - _ONE
    s = f / (_TWO + f)
    z = s * s
    c = _ATANH_TERMS
    q = z * ((c[0] + c[1] * z) + (z * z) * (c[2] + c[3] * z))
    return k * _LN2_HI + (k * _LN2_LO + (f - s * (f - q)))
