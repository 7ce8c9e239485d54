"""Launching the weight-only kernels: which formats they cover, which tile shape each problem gets, and the call.

`wxa16_linear` takes a layer's weight in the kernels' form (lowbit.kernels.weights.kernel_weight, built once per
layer). `unsupported` names why a format has no kernel (the caller then runs the plain-torch reference and says so
once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.kernels import weights
from lowbit.kernels.weights import KernelWeight, Outliers


@dataclass(frozen=True)
class Tiles:
    """One launch configuration. mode: "gemv" (one program per BN outputs of one row, CUDA-core FMAs), "dot"
    (BM × BN tiles on tensor cores), both with K split SPLIT_K ways, or "dequant" (ŵ written once, then cuBLAS);
    for the rows layout (lowbit.kernels.gemv_rows) "rows" (its GEMV; split_k 0: enough to fill the GPU) or
    "dequant". unroll: tiles of K loaded per step by the GEMV, words per step in the rows layout; field: how the
    GEMV turns a code into a float (lowbit.kernels.wxa16.gemv_kernel; 0: the fastest that applies)."""

    mode: str
    bm: int
    bn: int
    split_k: int = 1
    warps: int = 4
    stages: int = 3
    unroll: int = 1
    field: int = 0


def unsupported(fmt, act) -> str | None:
    """Why this layer format has no weight-only kernel, or None when it has one."""
    if act is not None:
        return f"activations quantized to {act.kind}"
    return weights.unsupported(fmt)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def choose_tiles(m: int, n: int, k: int, bits: int, sms: int) -> Tiles:
    """A launch shape for M×K · K×N (benchmarks/gpu_kernels.py --sweep on an H200 chose these): one row is a GEMV
    over blocks of 32 outputs, four tiles of K per step, K split when there are fewer blocks than SMs; a few
    rows are 16 × 64 tensor-core tiles with K split until the grid covers the GPU four times; many
    rows dequantize once for cuBLAS."""
    if m <= 2:
        bn = 32
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


_SMS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter (tests on CPU): an H100/H200-sized grid
        return 132
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def wxa16_linear(x: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None,
                 tiles: Tiles | None = None) -> torch.Tensor:
    """y = x · ŵᵀ (+ bias) in x's dtype, for x [..., K] on a CUDA device; kw from `kernel_weight`."""
    from lowbit.kernels.wxa16 import dequant_kernel, dot_kernel, gemv_kernel

    if kw.layout == "rows":
        from lowbit.kernels.gemv_rows import rows_linear

        return rows_linear(x, kw, bias, tiles)
    k = x.shape[-1]
    x2 = input_rows(x, kw.perm)
    m, n = x2.shape[0], kw.out_features
    t = tiles or choose_tiles(m, n, k, kw.field, _sm_count(x.device))
    stats = dict(BITS=kw.field, GROUP=kw.group, MODE=int(kw.mode), ZERO=kw.symmetric_zero, BW=kw.slice_words)
    kwords, ng = kw.words.shape[1], kw.stats.shape[1]
    if t.mode == "dequant":
        w = torch.empty(n, k, device=x.device, dtype=x.dtype)
        grid = (-(-n // t.bn), kwords // kw.slice_words)
        dequant_kernel[grid](kw.words, kw.stats, w, n, k, kwords, ng, **stats, BN=t.bn, num_warps=t.warps)
        if kw.outliers is not None:
            place_outliers(w, kw.outliers)
        return torch.nn.functional.linear(x2, w, bias).reshape(*x.shape[:-1], n)
    b = bias if bias is not None else kw.stats  # a pointer the kernel never reads
    flags = dict(stats, HAS_BIAS=bias is not None, BN=t.bn, SPLIT_K=t.split_k, num_warps=t.warps,
                 num_stages=t.stages)
    y = accumulator(x, m, n, t.split_k, kw.outliers is not None)
    if t.mode == "gemv":
        gemv_kernel[(-(-n // t.bn), m, t.split_k)](x2, kw.words, kw.stats, b, y, n, k, kwords, ng, x2.stride(0),
                                                   y.stride(0), **flags, UNROLL=t.unroll,
                                                   FIELD=_field_variant(t.field, kw.field, x.is_cuda))
    else:
        grid = (-(-m // t.bm), -(-n // t.bn), t.split_k)
        dot_kernel[grid](x2, kw.words, kw.stats, b, y, m, n, k, kwords, ng, x2.stride(0), y.stride(0), **flags,
                         BM=t.bm)
    return finish_product(x, x2, y, kw.outliers)


def place_outliers(w: torch.Tensor, o: Outliers) -> None:
    """SpQR's stored outlier values written over the dense grid's in a dequantized ŵ [N, K] (any strides)."""
    n = w.shape[0]
    rows = torch.repeat_interleave(torch.arange(n, device=w.device), (o.row_ptr[1:] - o.row_ptr[:-1]).long(),
                                   output_size=o.values.numel())
    w.index_put_((rows, o.cols.long() & 0xFFFF), o.values.to(w.dtype))


def input_rows(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] as rows [M, K] with unit column stride, its columns in the kernel's order (`perm`) if any."""
    x2 = x.reshape(-1, x.shape[-1])
    if perm is not None:
        return x2.index_select(1, perm)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def accumulator(x: torch.Tensor, m: int, n: int, split_k: int, sparse: bool) -> torch.Tensor:
    """The output the kernels write: zeroed float32 when K is split (atomic adds) or outliers are added after,
    else x's dtype."""
    if split_k > 1:
        return torch.zeros(m, n, device=x.device, dtype=torch.float32)
    return torch.empty(m, n, device=x.device, dtype=torch.float32 if sparse else x.dtype)


def finish_product(x: torch.Tensor, x2: torch.Tensor, y: torch.Tensor, outliers: Outliers | None) -> torch.Tensor:
    """SpQR's outliers added to y (if any), then y in x's dtype and leading shape."""
    if outliers is not None:
        add_outliers(x2, y, outliers)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[1])


def add_outliers(x2: torch.Tensor, y: torch.Tensor, o: Outliers, bn: int = 8, ch: int = 64, warps: int = 2) -> None:
    """y [M, N] (float32) += the sparse product of x2 [M, K] with SpQR's outlier corrections (the launch shape the
    sweep chose on an H200, 1% outliers)."""
    from lowbit.kernels.wxa16 import outliers_kernel

    n = y.shape[1]
    outliers_kernel[(-(-n // bn), y.shape[0])](x2, o.row_ptr, o.cols, o.corrections, y, n, x2.stride(0), y.stride(0),
                                               BN=bn, CH=ch, num_warps=warps)


def _field_variant(asked: int, bits: int, cuda: bool, fastest: int = 3) -> int:
    """The GEMV's code → float variant: the byte permutes (2, 3) need 4-bit fields and a GPU (Triton's interpreter
    runs no inline assembly); else shift and mask (1). 0 asks for `fastest` where it applies (on an H200: 3 for the
    tile layout's GEMV, 1.03–1.08× faster than 2; 2 for the rows layout's)."""
    if asked >= 2 and not (bits == 4 and cuda):
        raise ValueError("the byte-permute GEMV variants need 4-bit fields on a CUDA device")
    if asked:
        return asked
    return fastest if bits == 4 and cuda else 1


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
