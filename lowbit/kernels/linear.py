"""Launching the weight-only kernels: which formats they cover, which tile shape each problem gets, and the call.

`wxa16_linear` takes the codes in the kernel layout (`to_kernel_layout`, done once per layer) and the scales and
zero points as the checkpoint stores them. `unsupported` names why a format has no kernel (the caller then runs
the plain-torch reference and says so once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.granularity import PerChannel, PerGroup
from lowbit.formats.intgrid import IntFormat
from lowbit.kernels.layout import interleave, slice_words

KERNEL_BITS = (2, 4, 8)


@dataclass(frozen=True)
class Tiles:
    """One launch configuration. mode: "gemv" (one program per BN outputs of one row, CUDA-core FMAs), "dot"
    (BM × BN tiles on tensor cores), both with K split SPLIT_K ways, or "dequant" (ŵ written once, then cuBLAS).
    unroll: tiles of K loaded per step by the GEMV."""

    mode: str
    bm: int
    bn: int
    split_k: int = 1
    warps: int = 4
    stages: int = 3
    unroll: int = 1


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
    """A launch shape for M×K · K×N (benchmarks/gpu_kernels.py --sweep on an H200 chose these): one row is a GEMV
    over blocks of 16 outputs, four tiles of K per step, K split when there are fewer blocks than SMs; a few
    rows are 16 × 64 tensor-core tiles with K split until the grid covers the GPU four times; many
    rows dequantize once for cuBLAS."""
    if m <= 2:
        bn = 16
        split = 1
        while -(-n // bn) * m * split < sms and k // (split * 2) >= 2048:
            split *= 2
        return Tiles("gemv", 1, bn, split, warps=8, unroll=4)
    if m <= 64:
        bm, bn = max(16, _pow2_at_least(m)), 64
        tiles = -(-n // bn) * -(-m // bm)
        split = 1
        while tiles * split < 4 * sms and k // (split * 2) >= 1024:
            split *= 2
        return Tiles("dot", bm, bn, split, warps=4, stages=3)
    return Tiles("dequant", 0, 32, warps=4)


def group_size(fmt: IntFormat) -> int:
    """Columns per group, 0 for one group per row."""
    return fmt.granularity.size if isinstance(fmt.granularity, PerGroup) else 0


def to_kernel_layout(qweight: torch.Tensor, fmt: IntFormat, in_features: int) -> torch.Tensor:
    """The checkpoint's codes re-ordered for the kernels (lowbit.kernels.layout); done once per layer."""
    return interleave(qweight, fmt.bits, in_features, slice_words(fmt.bits, group_size(fmt)))


_SMS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter (tests on CPU): an H100/H200-sized grid
        return 132
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def wxa16_linear(x: torch.Tensor, fmt: IntFormat, kweight: torch.Tensor, scales: torch.Tensor,
                 qzeros: torch.Tensor | None, bias: torch.Tensor | None, out_features: int,
                 tiles: Tiles | None = None) -> torch.Tensor:
    """y = x · ŵᵀ (+ bias) in x's dtype, for x [..., K] on a CUDA device; kweight in the kernel layout."""
    from lowbit.kernels.wxa16 import dequant_kernel, dot_kernel, gemv_kernel

    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], out_features
    t = tiles or choose_tiles(m, n, k, fmt.bits, _sm_count(x.device))
    group = group_size(fmt)
    bw = slice_words(fmt.bits, group)
    z = qzeros if qzeros is not None else scales  # a pointer the kernel never reads
    stats = dict(BITS=fmt.bits, GROUP=group, HAS_ZERO=qzeros is not None, BW=bw)
    kw, ng = kweight.shape[1], scales.shape[1]
    if t.mode == "dequant":
        w = torch.empty(n, k, device=x.device, dtype=x.dtype)
        grid = (-(-n // t.bn), kw // bw)
        dequant_kernel[grid](kweight, scales, z, w, n, k, kw, ng, **stats, BN=t.bn, num_warps=t.warps)
        return torch.nn.functional.linear(x, w, bias)
    b = bias if bias is not None else scales
    flags = dict(stats, HAS_BIAS=bias is not None, BN=t.bn, SPLIT_K=t.split_k, num_warps=t.warps,
                 num_stages=t.stages)
    y = torch.zeros(m, n, device=x.device, dtype=torch.float32) if t.split_k > 1 else \
        torch.empty(m, n, device=x.device, dtype=x.dtype)
    if t.mode == "gemv":
        gemv_kernel[(-(-n // t.bn), m, t.split_k)](x2, kweight, scales, z, b, y, n, k, kw, ng, x2.stride(0),
                                                   y.stride(0), **flags, UNROLL=t.unroll)
    else:
        grid = (-(-m // t.bm), -(-n // t.bn), t.split_k)
        dot_kernel[grid](x2, kweight, scales, z, b, y, m, n, k, kw, ng, x2.stride(0), y.stride(0), **flags,
                         BM=t.bm)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def quantize_rows(x2: torch.Tensor, act, input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation codes [M, K] (int8 or float8_e4m3fn) and their float32 scale ([M] per token, or [1])."""
    from lowbit.formats.activation import QMAX, activation_scale, dynamic_amax
    from lowbit.kernels.w8a8 import quantize_rows_kernel

    m, k = x2.shape
    fp8 = act.kind == "fp8"
    q = torch.empty(m, k, device=x2.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    if input_scale is None and act.granularity == "tensor":  # dynamic per tensor: one amax over all rows first
        input_scale = activation_scale(dynamic_amax(x2, act), act)
    static = input_scale is not None
    s = input_scale.float().reshape(1) if static else torch.empty(m, device=x2.device, dtype=torch.float32)
    quantize_rows_kernel[(m,)](x2, q, s, k, x2.stride(0), QMAX=QMAX[act.kind], IS_FP8=fp8, STATIC=static,
                               BK=min(2048, _pow2_at_least(k)), num_warps=4)
    return q, s


def w8a8_linear(x: torch.Tensor, act, input_scale: torch.Tensor | None, wq: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, use_cublas_fp8: bool | None = None,
                tiles: Tiles | None = None) -> torch.Tensor:
    """y = x · ŵᵀ (+ bias) in x's dtype with x quantized per `act` and the product taken on codes: wq [N, ≥K]
    float8_e4m3fn, int8, or uint8 (a symmetric 8-bit checkpoint's codes c, value c − 128: the bytes of its packed
    words, read in place); w_scale float32 [1, N] or [1, 1]. fp8 runs on cuBLASLt's scaled matmul by default,
    int8 on lowbit's Triton kernel."""
    from lowbit.kernels.w8a8 import scaled_mm_kernel

    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], wq.shape[0]
    q, s = quantize_rows(x2, act, input_scale)
    fp8 = wq.dtype == torch.float8_e4m3fn
    cublas = use_cublas_fp8 if use_cublas_fp8 is not None else x.is_cuda
    # cuBLASLt's row-wise scaled fp8 product writes bfloat16 only, and wants M and K in multiples of 16
    if fp8 and cublas and x.dtype == torch.bfloat16 and m % 16 == 0 and k % 16 == 0 and m > 64:
        sa = s.reshape(-1, 1).expand(m, 1).contiguous()
        sb = w_scale.float().reshape(1, -1).expand(1, n).contiguous()
        y = torch._scaled_mm(q, wq.t(), scale_a=sa, scale_b=sb, bias=bias, out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], n)
    t = tiles or w8a8_tiles(m, n, k, _sm_count(x.device))
    y = torch.zeros(m, n, device=x.device, dtype=torch.float32) if t.split_k > 1 else \
        torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (-(-m // t.bm) * -(-n // t.bn), t.split_k)
    scaled_mm_kernel[grid](q, wq, s, w_scale, bias if bias is not None else s, y, m, n, k, wq.stride(0),
                           y.stride(0), SA_ROWS=s.numel() > 1 or (input_scale is None and act.granularity == "token"),
                           SB_COLS=w_scale.numel() > 1, B_OFFSET=wq.dtype == torch.uint8, HAS_BIAS=bias is not None,
                           BM=t.bm, BN=t.bn, BK=128, GROUP_M=8, SPLIT_K=t.split_k, num_warps=t.warps,
                           num_stages=t.stages)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def w8a8_tiles(m: int, n: int, k: int, sms: int) -> Tiles:
    """Tensor-core tiles for the W8A8 kernel: large tiles for many rows; for few rows narrow tiles and K split
    until the grid covers the GPU twice (one row is a stream of weights)."""
    if m > 64:
        return Tiles("dot", 128, 128, 1, warps=8, stages=3)
    bm, bn = 16 if m <= 16 else (32 if m <= 32 else 64), 64
    split = 1
    while -(-n // bn) * -(-m // bm) * split < 2 * sms and k // (split * 2) >= 512:
        split *= 2
    return Tiles("dot", bm, bn, split, warps=4, stages=4)
