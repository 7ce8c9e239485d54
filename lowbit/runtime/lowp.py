"""Matmuls on codes: y = (X_q · W_qᵀ) ⊙ (s_x · s_wᵀ) for int8 × int8 and fp8 × fp8 operands.

X_q are the activation codes with one scale per token (s_x [M, 1]) or per tensor; W_q the weight codes with one
scale per output channel (s_w [1, N]) or per tensor. The accumulator A = X_q · W_qᵀ comes from torch's native
kernel on a GPU (`torch._int_mm`: int32 accumulation; `torch._scaled_mm` with unit scales: float32 accumulation),
and from an emulation in float64 on the CPU, where BLAS in float64 is about 10× faster than torch's int8 kernel
(measured: 13 ms against 135 ms for 256 × 576 → 1536 on 2 cores). For int8 both give the exact integer A
(|A| ≤ 127²·K is far below 2^53), so the results are bit-equal; for fp8 every product is exact and only the
summation differs (Hopper's fp8 tensor cores keep fewer accumulator bits, about 2^-14 relative). The scales are
applied afterwards, in the same order either way.
"""

from __future__ import annotations

import torch

from lowbit.formats.activation import ActFormat, encode_activation
from lowbit.formats.fp8 import FP8Format
from lowbit.formats.granularity import PerGroup
from lowbit.formats.intgrid import IntFormat

MODES = ("auto", "native", "emulate")
_mode = {"value": "auto"}
_unavailable: set[tuple[str, str]] = set()  # (device type, kind) whose native kernel refused to run


def set_matmul_mode(mode: str) -> None:
    """auto: the native kernel on a GPU where it runs, else the emulation; native: the native kernel or fail;
    emulate: never the native kernel."""
    if mode not in MODES:
        raise ValueError(f"matmul mode {mode!r}: expected one of {', '.join(MODES)}")
    _mode["value"] = mode


def codes_kind(fmt, act: ActFormat) -> str | None:
    """"int8" or "fp8" when a weight of this format can enter a codes matmul with activations of this kind:
    symmetric 8-bit integers (no g_idx) with int8 activations, fp8 with fp8, one scale per row or per tensor.
    None otherwise (groups of columns, fewer bits)."""
    if isinstance(getattr(fmt, "granularity", None), PerGroup):
        return None
    if isinstance(fmt, IntFormat) and fmt.bits == 8 and fmt.symmetric and not fmt.g_idx and act.kind == "int8":
        return "int8"
    if isinstance(fmt, FP8Format) and act.kind == "fp8":
        return "fp8"
    return None


def weight_operand(qw, act: ActFormat) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(codes [N, K] as int8 or float8, scale float32 [1, N] or [1, 1]) when `codes_kind` allows a codes matmul;
    None otherwise: the caller then works on dequantized values."""
    kind = codes_kind(qw.fmt, act)
    if kind is None:
        return None
    codes = (qw.codes.to(torch.int16) - 128).to(torch.int8) if kind == "int8" else qw.codes
    return codes, qw.scale.float().reshape(1, -1)


def _native(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    m = xq.shape[0]
    if xq.is_cuda:  # cuBLAS wants more than 16 rows (int8) and a multiple of 16 (fp8): pad with zero rows
        padded = max(32, -(-m // 16) * 16)
        if padded != m:
            xq = torch.cat([xq, xq.new_zeros(padded - m, xq.shape[1])])
    if xq.dtype == torch.int8:
        acc = torch._int_mm(xq, wq.t())
    else:
        one = torch.ones((), device=xq.device)
        acc = torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return acc[:m].float()


def _emulated(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    return (xq.double() @ wq.double().t()).float()


def accumulate(xq: torch.Tensor, wq: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    """A = X_q · W_qᵀ in float32, natively or emulated (see the module docstring)."""
    mode = mode or _mode["value"]
    key = (xq.device.type, str(xq.dtype))
    if mode == "native" or (mode == "auto" and xq.is_cuda and key not in _unavailable):
        try:
            return _native(xq, wq)
        except (RuntimeError, NotImplementedError):
            if mode == "native":
                raise
            _unavailable.add(key)
    return _emulated(xq, wq)


def codes_matmul(x: torch.Tensor, act: ActFormat, input_scale: torch.Tensor | None, wq: torch.Tensor,
                 w_scale: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    """y [M, N] float32 for x [M, K]: quantize x (static `input_scale` or dynamic), multiply the codes, rescale."""
    xq, sx = encode_activation(x, act, input_scale)
    return accumulate(xq, wq, mode) * sx * w_scale
