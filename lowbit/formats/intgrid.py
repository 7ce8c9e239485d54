"""Uniform integer grids of 2–8 bits, symmetric or asymmetric (with a zero point).

Codes are stored unsigned, c ∈ [0, 2^b − 1], and dequantize as ŵ = (c − z)·s.

- symmetric:  s = max|w| / (2^(b−1) − 1),  z = 2^(b−1)            (the zero point is implicit)
- asymmetric: s = (max(w, 0) − min(w, 0)) / (2^b − 1),  z = round(−min(w, 0) / s)
- codes:      c = clamp(round(w / s) + z, 0, 2^b − 1)

Scales are stored in float16 and rounded *up* to the next float16 value, so an absmax scale stays
non-saturating after storage and |w − ŵ| ≤ s/2 holds for every weight (the property the tests check).
A clipping search (lowbit.formats.search) shrinks the range per group to trade a few saturated weights for a
finer step; it is the saturating alternative.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.errors import LowbitError
from lowbit.formats.granularity import Granularity, PerChannel, granularity_from_dict

SCALE_DTYPE = torch.float16
_SMALLEST_SCALE = 2.0**-24  # the smallest positive float16 (subnormal)


@dataclass(frozen=True)
class IntFormat:
    """b-bit integer weights; `clip` selects the error-minimizing range search instead of absmax."""

    bits: int
    symmetric: bool = True
    granularity: Granularity = field(default_factory=PerChannel)
    clip: bool = False

    kind = "int"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise LowbitError(f"integer formats have 2 to 8 bits; got {self.bits!r}. Pick a bit width in 2..8.")

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def to_dict(self) -> dict:
        return {"kind": "int", "bits": self.bits, "symmetric": self.symmetric,
                "granularity": self.granularity.to_dict(), "clip": self.clip}

    @classmethod
    def from_dict(cls, d: dict) -> IntFormat:
        return cls(bits=int(d["bits"]), symmetric=bool(d["symmetric"]),
                   granularity=granularity_from_dict(d["granularity"]), clip=bool(d.get("clip", False)))


def round_scale_up(scale: torch.Tensor) -> torch.Tensor:
    """Float16 scale ≥ the float32 one (so absmax ranges stay inside the grid), at least the smallest float16."""
    scale = scale.float().clamp(min=_SMALLEST_SCALE)
    half = scale.to(SCALE_DTYPE)
    half = torch.where(half.float() < scale, torch.nextafter(half, torch.full_like(half, float("inf"))), half)
    if torch.isinf(half).any():
        raise LowbitError("a weight is too large for a float16 scale (|w| above about 6.5e4 × 2^(b-1)). "
                          "Check the model's weights for corrupt values.")
    return half


def grid_params(lo: torch.Tensor, hi: torch.Tensor, fmt: IntFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float16) and zero point (uint8 codes) for groups whose range is [lo, hi]."""
    if fmt.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = round_scale_up(amax / (2 ** (fmt.bits - 1) - 1))
        zero = torch.full_like(scale, 2 ** (fmt.bits - 1), dtype=torch.uint8)
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = round_scale_up((hi - lo) / fmt.qmax)
        zero = torch.round(-lo / scale.float()).clamp(0, fmt.qmax).to(torch.uint8)
    return scale, zero


def encode(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """Codes for grouped weights wg [rows, groups, size] given [rows, groups] scale and zero."""
    q = torch.round(wg / scale.float().unsqueeze(-1)) + zero.float().unsqueeze(-1)
    return q.clamp(0, fmt.qmax).to(torch.uint8)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """ŵ = (c − z)·s in float32, for grouped codes [rows, groups, size]."""
    return (codes.float() - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
