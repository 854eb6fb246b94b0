"""Group-wise symmetric integer quantization of expert weights (int8, int4), and its exact inverse.

A weight matrix [rows, cols] is cut along its last dimension into groups of `group_size` values; each
group keeps one float16 scale (its largest magnitude / qmax) and the values round(w / scale) clamped to
[-qmax, qmax] (qmax 127 for int8, 7 for int4). int8 values are stored as int8 [rows, cols]; int4 values
as two's-complement nibbles, two per byte (even column in the low nibble), uint8 [rows, cols / 2]. The
scales are float16 [rows, cols / group_size]. This is the layout of GGUF's Q8_0 / Q4_0 in spirit (one
half-precision scale per group of 32), so 8.5 and 4.5 bits per weight at the default group size.

`dequantize` is the one function that turns stored values back into weights: the packer's round trip,
the offloaded forward and the resident reference model all call it, so they compute with identical
weights and greedy tokens stay bit-identical.

`mxfp4` is a checkpoint's own format, kept as it is (gpt-oss; the OCP Microscaling spec's MXFP4): each
block of 32 weights along a row holds 4-bit E2M1 values (sign, 2 exponent bits, 1 mantissa bit: 0, 0.5,
1, 1.5, 2, 3, 4, 6 and their negatives), two per byte (even element in the low nibble), and one E8M0
scale (a power of two, 2^(byte - 127)). gpt-oss stores an expert weight as `W_blocks` uint8 [out, in/32,
16] and `W_scales` uint8 [out, in/32]; the packer keeps both (`W` and `W@scale`) and the forward
dequantizes to the experts module's [in, out] layout. The harness does not quantize to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.errors import HarnessError

SCALE_DTYPE = torch.float16
DEFAULT_GROUP_SIZE = 32


@dataclass(frozen=True)
class QuantFormat:
    name: str
    bits: int
    qmax: int
    storage: torch.dtype


MXFP4 = QuantFormat("mxfp4", 4, 6, torch.uint8)
FORMATS = {
    "int8": QuantFormat("int8", 8, 127, torch.int8),
    "int4": QuantFormat("int4", 4, 7, torch.uint8),
    MXFP4.name: MXFP4,
}
MXFP4_BLOCK = 32
"""Weights per E8M0 scale (OCP MX spec)."""
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""The value of each 4-bit E2M1 code (bit 3 the sign), from its definition in the OCP MX spec."""
E8M0_BIAS = 127


def quant_format(name: str) -> QuantFormat:
    if name == MXFP4.name:
        raise HarnessError(
            "mxfp4 is a checkpoint format: an MXFP4 checkpoint (gpt-oss) is packed in it as it is; the harness "
            "quantizes to int8 or int4 only"
        )
    if name not in FORMATS:
        raise HarnessError(f"unknown expert dtype {name!r}; choose one of: int8, int4")
    return FORMATS[name]


def check_group_size(cols: int, group_size: int, what: str) -> None:
    if group_size < 2 or group_size % 2 or cols % group_size:
        raise HarnessError(
            f"group size {group_size} does not divide {what}'s last dimension ({cols}) into even groups; "
            "choose a power of two that divides it (e.g. 32)"
        )


def quantize(weight: torch.Tensor, fmt: QuantFormat, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored values, float16 scales) of a 2D weight, group-wise along its last dimension."""
    rows, cols = weight.shape
    groups = weight.detach().to(torch.float32).reshape(rows, cols // group_size, group_size)
    scale = (groups.abs().amax(dim=-1) / fmt.qmax).to(SCALE_DTYPE)
    # A group of zeros keeps scale 0 and values 0; dividing by 1 there avoids 0/0.
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale).to(torch.float32)
    q = torch.round(groups / divisor[..., None]).clamp(-fmt.qmax, fmt.qmax).to(torch.int8).reshape(rows, cols)
    if fmt.bits == 4:
        nibbles = (q & 0xF).to(torch.uint8)
        q = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return q.contiguous(), scale.contiguous()


def dequantize(stored: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype` from its stored values and scales (the inverse of `quantize` up to rounding)."""
    if fmt is MXFP4:
        return dequantize_mxfp4(stored, scale, dtype)
    if fmt.bits == 4:
        # Arithmetic shifts of the bytes read as int8 sign-extend each nibble (the low one first).
        byte = stored.view(torch.int8)
        values = torch.stack([(byte << 4) >> 4, byte >> 4], dim=-1).reshape(stored.shape[0], -1)
    else:
        values = stored
    rows, cols = values.shape
    groups = values.to(torch.float32).reshape(rows, scale.shape[1], cols // scale.shape[1])
    return (groups * scale.to(torch.float32)[..., None]).reshape(rows, cols).to(dtype)


def round_trip(weight: torch.Tensor, fmt: QuantFormat, group_size: int) -> torch.Tensor:
    """The weight the offloaded forward will compute with: quantized, then dequantized to its own dtype."""
    return dequantize(*quantize(weight, fmt, group_size), fmt, weight.dtype)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An MXFP4 weight, blocks uint8 [out, in/32, 16] and E8M0 scales uint8 [out, in/32], as [in, out] in `dtype`."""
    out_rows, groups, _ = blocks.shape
    codes = torch.stack([blocks & 0xF, blocks >> 4], dim=-1).reshape(out_rows, groups, MXFP4_BLOCK)
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32)[codes.long()]
    # value * 2^(scale - 127), computed in float32, where every such product is exact, then rounded once.
    weight = torch.ldexp(values, scales.to(torch.int32)[..., None] - E8M0_BIAS)
    return weight.reshape(out_rows, groups * MXFP4_BLOCK).t().to(dtype)
