"""Dynamic per-token activation quantization (the "a8" of w8a8 and fp8), as an exact emulation.

int8: x̂ = clamp(round(x / s), −128, 127)·s with s = max_j |x_j| / 127 per token (row);
fp8:  x̂ = e4m3(x / s)·s with s = max_j |x_j| / 448 per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.formats.fp8 import fp8_decode, fp8_encode, fp8_scale
from lowbit.formats.intgrid import exact_div

ACT_KINDS = ("int8", "fp8")


@dataclass(frozen=True)
class ActFormat:
    """How a quantized linear layer quantizes its input at run time (dynamic, per token)."""

    kind: str

    def __post_init__(self) -> None:
        if self.kind not in ACT_KINDS:
            raise LowbitError(f"unknown activation format {self.kind!r}: expected one of {', '.join(ACT_KINDS)}.")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "granularity": "per_token", "dynamic": True}

    @classmethod
    def from_dict(cls, d: dict) -> ActFormat:
        return cls(kind=d["kind"])


def fake_quantize_activation(x: torch.Tensor, fmt: ActFormat) -> torch.Tensor:
    """Quantize-dequantize x per token (last dimension), in x's dtype."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    if fmt.kind == "int8":
        scale = exact_div(amax, 127).clamp(min=torch.finfo(torch.float32).tiny)
        return (torch.round(x.float() / scale).clamp(-128, 127) * scale).to(x.dtype)
    scale = fp8_scale(amax)
    return fp8_decode(fp8_encode(x, scale), scale).to(x.dtype)
