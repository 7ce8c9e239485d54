"""FP8 E4M3 weights (the OCP `e4m3fn` variant: max 448, no infinities) with a float32 scale.

ŵ = fp8(w / s)·s with s = max|w| / 448 per tensor or per output channel; the cast rounds to nearest even,
so the error is at most half an fp8 ulp at each value's magnitude (relative 2^-4 for normal values).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.errors import LowbitError
from lowbit.formats.granularity import Granularity, PerChannel, PerGroup, granularity_from_dict
from lowbit.formats.intgrid import exact_div

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_DTYPE = torch.float32


@dataclass(frozen=True)
class FP8Format:
    """E4M3 weights with per-tensor or per-channel float32 scales."""

    granularity: Granularity = field(default_factory=PerChannel)

    kind = "fp8"
    bits = 8
    symmetric = True
    clip = False

    def __post_init__(self) -> None:
        if isinstance(self.granularity, PerGroup):
            raise LowbitError("fp8 weights take per-tensor or per-channel scales, not groups: "
                              "use --group-size 0 (per channel) with --scheme fp8.")

    def to_dict(self) -> dict:
        return {"kind": "fp8", "granularity": self.granularity.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> FP8Format:
        return cls(granularity=granularity_from_dict(d["granularity"]))


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    return exact_div(amax.float(), FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)


def fp8_encode(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 codes of x/scale; values are clamped to ±448 first because e4m3fn has no infinity."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fp8_decode(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale
