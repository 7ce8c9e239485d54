"""Launching the weight-only kernel: which formats it covers, which tile shape each problem gets, and the call.

`wxa16_linear` takes the packed tensors exactly as QuantLinear holds them. `unsupported` names why a format has
no kernel (the caller then runs the plain-torch reference and says so once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.granularity import PerChannel, PerGroup
from lowbit.formats.intgrid import IntFormat

KERNEL_BITS = (2, 4, 8)


@dataclass(frozen=True)
class Tiles:
    """One launch configuration. mode: "gemv" (one program per BN outputs of one row, CUDA-core FMAs), "dot"
    (BM × BN tiles on tensor cores, K split SPLIT_K ways) or "dequant" (ŵ written once, then cuBLAS).
    bw: words of codes per row and step (bw·32/b columns)."""

    mode: str
    bm: int
    bn: int
    bw: int
    split_k: int = 1
    warps: int = 4
    stages: int = 3


def unsupported(fmt, act) -> str | None:
    """Why this layer format has no weight-only kernel, or None when it has one."""
    if act is not None:
        return f"activations quantized to {act.kind}"
    if not isinstance(fmt, IntFormat):
        return f"{fmt.kind} weights"
    if fmt.bits not in KERNEL_BITS:
        return f"{fmt.bits}-bit codes (kernels for {', '.join(map(str, KERNEL_BITS))} bits)"
    if fmt.float_zero:
        return "float zero points"
    if fmt.g_idx:
        return "a column → group map (g_idx)"
    g = fmt.granularity
    if isinstance(g, PerGroup) and (g.size < 16 or g.size & (g.size - 1)):
        return f"groups of {g.size} (kernels for powers of two from 16)"
    if not isinstance(g, (PerGroup, PerChannel)):
        return "one scale for the whole tensor"
    return None


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def choose_tiles(m: int, n: int, k: int, bits: int, sms: int) -> Tiles:
    """A launch shape for M×K · K×N (from benchmarks/kernels.py --sweep on an H200): one row is a GEMV over
    blocks of 4 outputs; a few rows are tensor-core tiles with K split until the grid covers the GPU four times;
    many rows dequantize once for cuBLAS."""
    if m == 1:
        return Tiles("gemv", 1, 4, 128, warps=4)
    if m <= 64:
        bm, bn, bw = max(16, _pow2_at_least(m)), 128, 16
        tiles = -(-n // bn) * -(-m // bm)
        split = 1
        while tiles * split < 4 * sms and k // (bw * (32 // bits) * split * 2) >= 4:
            split *= 2
        return Tiles("dot", bm, bn, bw, split, warps=4, stages=3)
    return Tiles("dequant", 0, 16, 16, warps=4)


def _group(fmt: IntFormat) -> int:
    return fmt.granularity.size if isinstance(fmt.granularity, PerGroup) else 0


_SMS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter (tests on CPU): an H100/H200-sized grid
        return 132
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def wxa16_linear(x: torch.Tensor, fmt: IntFormat, qweight: torch.Tensor, scales: torch.Tensor,
                 qzeros: torch.Tensor | None, bias: torch.Tensor | None, out_features: int,
                 tiles: Tiles | None = None) -> torch.Tensor:
    """y = x · ŵᵀ (+ bias) in x's dtype, for x [..., K] on a CUDA device and the layer's packed tensors."""
    from lowbit.kernels.wxa16 import dequant_kernel, dot_kernel, gemv_kernel

    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], out_features
    t = tiles or choose_tiles(m, n, k, fmt.bits, _sm_count(x.device))
    z = qzeros if qzeros is not None else scales  # a pointer the kernel never reads
    stats = dict(BITS=fmt.bits, GROUP=_group(fmt), HAS_ZERO=qzeros is not None)
    kw, ng = qweight.shape[1], scales.shape[1]
    if t.mode == "dequant":
        w = torch.empty(n, k, device=x.device, dtype=x.dtype)
        per = 32 // fmt.bits
        grid = (-(-n // t.bn), -(-k // (t.bw * per)))
        dequant_kernel[grid](qweight, scales, z, w, n, k, kw, ng, **stats, BN=t.bn, BW=t.bw, num_warps=t.warps)
        return torch.nn.functional.linear(x, w, bias)
    b = bias if bias is not None else scales
    flags = dict(stats, HAS_BIAS=bias is not None, BN=t.bn, BW=t.bw, num_warps=t.warps, num_stages=t.stages)
    if t.mode == "gemv":
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)
        gemv_kernel[(-(-n // t.bn), m)](x2, qweight, scales, z, b, y, n, k, kw, ng, x2.stride(0), y.stride(0),
                                        **flags)
    else:
        y = torch.zeros(m, n, device=x.device, dtype=torch.float32) if t.split_k > 1 else \
            torch.empty(m, n, device=x.device, dtype=x.dtype)
        grid = (-(-m // t.bm), -(-n // t.bn), t.split_k)
        dot_kernel[grid](x2, qweight, scales, z, b, y, m, n, k, kw, ng, x2.stride(0), y.stride(0), **flags, BM=t.bm,
                         SPLIT_K=t.split_k)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
