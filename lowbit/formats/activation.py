"""Activation quantization (the "a8" of w8a8 and fp8): what a quantized linear layer does to its input.

int8: x̂ = clamp(round(x / s), −128, 127)·s with s = amax / 127;
fp8:  x̂ = e4m3(x / s)·s with s = amax / 448.
amax is taken per token (the row's max |x_j|) or per tensor, at run time (dynamic) or once from calibration
(static; the SmoothQuant paper's O1 = per-token dynamic, O2 = per-tensor dynamic, O3 = per-tensor static).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.formats.fp8 import FP8_DTYPE, FP8_MAX, fp8_decode, fp8_encode
from lowbit.formats.intgrid import exact_div

ACT_KINDS = ("int8", "fp8")
ACT_GRANULARITIES = ("token", "tensor")
QMAX = {"int8": 127.0, "fp8": FP8_MAX}


def check_kv_kind(kind: str) -> None:
    """A KV cache is stored in one of the activation formats, with one scale per head and token."""
    if kind not in ACT_KINDS:
        raise LowbitError(f"KV-cache format {kind!r} is not known: use --kv-cache int8 or fp8.")


@dataclass(frozen=True)
class ActFormat:
    """How a quantized linear layer quantizes its input at run time."""

    kind: str
    granularity: str = "token"
    static: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ACT_KINDS:
            raise LowbitError(f"unknown activation format {self.kind!r}: expected one of {', '.join(ACT_KINDS)}.")
        if self.granularity not in ACT_GRANULARITIES:
            raise LowbitError(f"unknown activation granularity {self.granularity!r}: expected token or tensor.")
        if self.static and self.granularity != "tensor":
            raise LowbitError("static activation scales come from calibration, one per tensor: use "
                              "--act-granularity tensor with --act-static (a per-token scale can only be dynamic).")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "granularity": f"per_{self.granularity}", "dynamic": not self.static}

    @classmethod
    def from_dict(cls, d: dict) -> ActFormat:
        return cls(kind=d["kind"], granularity=d.get("granularity", "per_token").removeprefix("per_"),
                   static=not d.get("dynamic", True))

    def describe(self) -> str:
        return f"{self.kind} per-{self.granularity} {'static' if self.static else 'dynamic'} activations"


def activation_scale(amax: torch.Tensor, fmt: ActFormat) -> torch.Tensor:
    """The float32 scale that maps amax onto the format's largest value."""
    return exact_div(amax.float(), QMAX[fmt.kind]).clamp(min=torch.finfo(torch.float32).tiny)


def dynamic_amax(x: torch.Tensor, fmt: ActFormat) -> torch.Tensor:
    """max |x| per token (shape [..., 1]) or over the whole tensor (a scalar)."""
    a = x.detach().abs()
    return a.amax(dim=-1, keepdim=True).float() if fmt.granularity == "token" else a.amax().float()


def encode_activation(x: torch.Tensor, fmt: ActFormat,
                      scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int8 or float8_e4m3fn) and the float32 scale; `scale` is the static one, else it is computed."""
    if scale is None:
        if fmt.static:
            raise LowbitError("this layer quantizes its input with a static scale, but none was calibrated.")
        scale = activation_scale(dynamic_amax(x, fmt), fmt)
    if fmt.kind == "int8":
        return torch.round(x.float() / scale).clamp(-128, 127).to(torch.int8), scale
    return fp8_encode(x, scale), scale


def decode_activation(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return fp8_decode(codes, scale) if codes.dtype == FP8_DTYPE else codes.float() * scale


def fake_quantize_activation(x: torch.Tensor, fmt: ActFormat, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize x (last dimension = features), in x's dtype."""
    codes, s = encode_activation(x, fmt, scale)
    return decode_activation(codes, s).to(x.dtype)
