"""Branch-free exp and log that a compiled loop vectorises, for the learned policies' per-expert arithmetic.

numba has no vector math library here (no SVML): a loop calling `math.exp` or `math.log` makes one scalar libm
call per value, which was a third of `reuse-logit`'s replay time. These are plain arithmetic on the float's
bits, inlined into the loop, so that LLVM runs them 4 (float64) or 8 (float32) lanes at a time:
- `expf`: exp in float32 within 1 ulp (the FlashMoE network's SiLU, trained in float32);
- `exp64` and `log64`: exp and log in float64 within 2 ulp of libm's on their domains (tested).

Each takes its argument reduction from Cody and Waite (a split constant whose high part multiplies exactly)
and a truncated series whose truncation error is below half an ulp; the coefficients are the series' own
(1/k!, 2/(2k+1)), not fitted ones.
"""

from __future__ import annotations

import math
from decimal import Decimal

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


@njit(types.float32(types.float32) if types else None, cache=True)
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


LN2_HI = _LN2 - _LN2 % 2.0**-32
"""ln 2 to 32 bits: n * LN2_HI is exact in float64 for every |n| < 2^20; LN2_LO the rest, from ln 2 to 40 digits
(the float64 ln 2 is 2e-17 off, which n = 1000 would make 70 ulp of exp's result)."""
LN2_LO = float(Decimal("0.6931471805599453094172321214581765680755") - Decimal(LN2_HI))
_ROUND64 = 1.5 * 2.0**52
"""Adding it to a float64 of magnitude below 2^51 rounds it to an integer, held in the low mantissa bits."""
_ROUND64_BITS = int(np.float64(_ROUND64).view(np.int64))
EXP64_LIMIT = 700.0
"""exp64's input clamp: 2^n stays a normal float64 (exp(700) = 1e304, exp(-700) = 1e-304)."""
_EXP64_TERMS = tuple(1.0 / math.factorial(k) for k in range(14))
"""Taylor to degree 13: for |r| <= ln2 / 2 the truncation is 4e-18 relative."""
_SQRT2 = math.sqrt(2.0)
_MANTISSA = (1 << 52) - 1
_ONE_BITS = 1023 << 52
_TWO52_BITS = int(np.float64(2.0**52).view(np.int64))
"""OR-ing an integer 0 <= n < 2^52 into the mantissa of 2^52 gives the float 2^52 + n: an int-to-float conversion
with integer operations, which AVX2 has for 4 lanes (its conversion instructions stop at 32-bit integers)."""
_ATANH_TERMS = tuple(1.0 / (2 * k + 1) for k in range(1, 10))
"""log m = 2 atanh(s) = 2 (s + s^3/3 + ... + s^19/19 + ...), s = (m - 1) / (m + 1), |s| <= 0.1716 for m in
[sqrt(1/2), sqrt(2)): the terms past s^19 are below 3e-17 of the sum."""


@njit(types.float64(types.float64) if types else None, cache=True, inline="always", fastmath={"contract"})
def exp64(t: float) -> float:
    """exp(t) in float64 within 2 ulp, t clamped to [-700, 700] (beyond, 1e304 or 1e-304 stand for inf and 0).
    t = n ln2 + r, |r| <= ln2 / 2; exp(r) = 1 + q with q the Taylor series in Estrin's form, with fused
    multiply-adds; 2^n from the exponent bits."""
    t = min(max(t, -EXP64_LIMIT), EXP64_LIMIT)
    k = t * (1.0 / _LN2) + _ROUND64
    n = k - _ROUND64
    r = (t - n * LN2_HI) - n * LN2_LO
    c = _EXP64_TERMS
    r2 = r * r
    r4 = r2 * r2
    r8 = r4 * r4
    low = ((c[1] + c[2] * r) + r2 * (c[3] + c[4] * r)) + r4 * ((c[5] + c[6] * r) + r2 * (c[7] + c[8] * r))
    high = ((c[9] + c[10] * r) + r2 * (c[11] + c[12] * r)) + r4 * c[13]
    q = r * (low + r8 * high)
    two_n = np.int64((np.float64(k).view(np.int64) - _ROUND64_BITS + 1023) << 52).view(np.float64)
    return (1.0 + q) * two_n


@njit(types.float64(types.float64) if types else None, cache=True, inline="always", fastmath={"contract"})
def log64(x: float) -> float:
    """log(x) in float64 within 2 ulp for a positive normal x (the callers' values are at least 0.5; zero,
    subnormals, infinities and NaN are outside its domain). x = 2^k m with m in [sqrt(1/2), sqrt(2));
    log m by the atanh series of s = (m - 1) / (m + 1) (`_ATANH_TERMS`), its polynomial in s^2 in Estrin's form
    (a dependency chain of 4 multiply-adds instead of Horner's 8) and with fused multiply-adds."""
    bits = np.float64(x).view(np.int64)
    m = np.int64((bits & _MANTISSA) | _ONE_BITS).view(np.float64)  # x's mantissa, in [1, 2)
    k = np.int64((bits >> 52) | _TWO52_BITS).view(np.float64) - (2.0**52 + 1023.0)  # x's exponent
    high = m > _SQRT2
    m = m * 0.5 if high else m
    k = k + 1.0 if high else k
    f = m - 1.0
    s = f / (2.0 + f)
    z = s * s
    z2 = z * z
    z4 = z2 * z2
    c = _ATANH_TERMS
    p = ((c[0] + c[1] * z) + z2 * (c[2] + c[3] * z)) + z4 * (((c[4] + c[5] * z) + z2 * (c[6] + c[7] * z)) + z4 * c[8])
    return k * LN2_HI + (k * LN2_LO + (2.0 * s + 2.0 * s * (z * p)))
