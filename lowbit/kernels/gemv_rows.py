"""Weight-only products on the second layout, "rows": SpQR's (lowbit.kernels.weights), where it is the faster one.

Layout: words [KW, N] (int32), word w of row n holding the codes of columns P·w … P·w + P − 1 in its fields (the
checkpoint's own sequential order, P = 32/b fields of b = 2, 4, 8 bits), and the statistics words transposed,
[NG, N]. A thread loads the same word of several consecutive rows in one vector load, so each value of x is loaded
and converted once for all of them, and a group of 16 columns (SpQR's β1) is two words of one thread, its
statistics one word per row read once.

- `gemv_rows_kernel` (a few rows of x, each a stream of weights): per code one FMA on f = B + c (byte permute or
  shift and mask, as in lowbit.kernels.wxa16), the group's zero and offset taken out per word through Σx:
  y_n += s·(Σ_j f_j·x_j − (B + z)·Σ_j x_j); SpQR's outliers follow in their own kernel (adding them in the
  GEMV's programs, each taking a share, measured 1.3–1.5× slower on an H200).
- `dequant_rows_kernel` writes ŵᵀ [K, N] for cuBLAS when x has many rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.epilogue import bias_and_store
from lowbit.kernels.linear import (
    Tiles,
    _field_variant,
    _sm_count,
    accumulator,
    finish_product,
    input_rows,
    place_outliers,
)
from lowbit.kernels.weights import KernelWeight
from lowbit.kernels.wxa16 import (
    _close_group,
    _code_float,
    _field,
    _magic,
    _nibbles,
    _split_stats,
    _weight,
    k_share,
)

GEMV_ROWS = 4  # up to this many rows of x the GEMV reads the weights once per row; beyond, ŵ once for cuBLAS


def rows_tiles(m: int) -> Tiles:
    """The launch shape for M rows of x (benchmarks/gpu_kernels.py --sweep on an H200 chose BN = 256 outputs per
    program, 16 words per step, 8 warps, for SpQR at M = 1); `unroll` is the words per step."""
    if m <= GEMV_ROWS:
        return Tiles("rows", 1, 256, 0, warps=8, unroll=16)
    return Tiles("dequant", 0, 64, warps=4, unroll=16)


@triton.jit
def gemv_rows_kernel(x_ptr, w_ptr, st_ptr, b_ptr, y_ptr, N, K, KW, NG, stride_xm, stride_ym,
                     BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr, ZERO: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BN: tl.constexpr, BWT: tl.constexpr, SPLIT_K: tl.constexpr,
                     FIELD: tl.constexpr):
    """One program: BN outputs of one row of x over its share of K, BWT words (BWT·P columns) per step."""
    PER: tl.constexpr = 32 // BITS
    WPG: tl.constexpr = 0 if GROUP == 0 else GROUP // PER  # words per group
    TILE_STATS: tl.constexpr = GROUP == 0 or WPG >= BWT  # one group for the whole tile
    BASE: tl.constexpr = 128.0 if FIELD >= 2 else float(1 << BITS)
    magic = _magic(N, FIELD)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rw = tl.arange(0, BWT)
    x_row = x_ptr + pid_m * stride_xm
    steps = tl.cdiv(KW, BWT)
    s_lo, s_hi = k_share(steps, pid_k, SPLIT_K)
    acc = tl.zeros((BWT, BN), tl.float32)
    ok_n = (rn < N)[None, :]
    for step in tl.range(s_lo, s_hi):
        w = step * BWT + rw
        live = (w < KW)[:, None]
        words = tl.load(w_ptr + w[:, None] * N + rn[None, :], mask=live & ok_n, other=0)
        if TILE_STATS:
            if GROUP == 0:
                v = tl.load(st_ptr + rn, mask=rn < N, other=0)[None, :]
            else:
                g = (step * BWT * PER) // GROUP
                v = tl.load(st_ptr + g * N + rn, mask=(rn < N) & (g < NG), other=0)[None, :]
        else:
            g = (w * PER) // GROUP
            v = tl.load(st_ptr + g[:, None] * N + rn[None, :], mask=live & ok_n & (g < NG)[:, None], other=0)
        s, z = _split_stats(v, MODE, ZERO)
        lo, hi = _nibbles(words, FIELD)
        part = tl.zeros((BWT, BN), tl.float32)
        sx = tl.zeros((BWT, 1), tl.float32)
        for j in tl.static_range(PER):
            col = w * PER + j
            x = tl.load(x_row + col, mask=col < K, other=0.0).to(tl.float32)[:, None]
            f = _code_float(words, lo, hi, j, BITS, FIELD, magic)
            part += f * x
            sx += x
        acc = _close_group(acc, part, sx, s, z, BASE, MODE)
    y = tl.sum(acc, axis=0)
    bias_and_store(y, b_ptr, rn, N, y_ptr + pid_m * stride_ym + rn, rn < N, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def dequant_rows_kernel(w_ptr, st_ptr, out_ptr, N, K, KW, NG, BITS: tl.constexpr, GROUP: tl.constexpr,
                        MODE: tl.constexpr, ZERO: tl.constexpr, BN: tl.constexpr, BWT: tl.constexpr):
    """ŵᵀ [K, N] in out's dtype from BWT words of BN rows per program: the layout's own order, so that each store
    is contiguous along N (cuBLAS then reads ŵ transposed, at no cost)."""
    PER: tl.constexpr = 32 // BITS
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    w = tl.program_id(1) * BWT + tl.arange(0, BWT)
    ok = (w < KW)[:, None] & (rn < N)[None, :]
    words = tl.load(w_ptr + w[:, None] * N + rn[None, :], mask=ok, other=0)
    if GROUP == 0:
        v = tl.load(st_ptr + rn, mask=rn < N, other=0)[None, :]
    else:
        g = (w * PER) // GROUP
        v = tl.load(st_ptr + g[:, None] * N + rn[None, :], mask=ok & (g < NG)[:, None], other=0)
    s, z = _split_stats(v, MODE, ZERO)
    for j in tl.static_range(PER):
        col = w * PER + j
        wt = _weight(_field(words, j, BITS), s, z, MODE)
        tl.store(out_ptr + col[:, None] * N + rn[None, :], wt.to(out_ptr.dtype.element_ty),
                 mask=ok & (col < K)[:, None])


def rows_linear(x: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None, tiles: Tiles | None = None,
                field: int = 0) -> torch.Tensor:
    """y = x · ŵᵀ (+ bias) in x's dtype for x [..., K] and a weight in the rows layout."""
    k = x.shape[-1]
    x2 = input_rows(x, kw.perm)
    m, n = x2.shape[0], kw.out_features
    t = tiles or rows_tiles(m)
    kwords, ng = kw.words.shape[0], kw.stats.shape[0]
    stats = dict(BITS=kw.field, GROUP=kw.group, MODE=int(kw.mode), ZERO=kw.symmetric_zero)
    if t.mode == "dequant":
        wt = torch.empty(k, n, device=x.device, dtype=x.dtype)
        dequant_rows_kernel[(-(-n // t.bn), -(-kwords // t.unroll))](kw.words, kw.stats, wt, n, k, kwords, ng,
                                                                     **stats, BN=t.bn, BWT=t.unroll, num_warps=t.warps)
        if kw.outliers is not None:
            place_outliers(wt.T, kw.outliers)
        return torch.nn.functional.linear(x2, wt.T, bias).reshape(*x.shape[:-1], n)
    if t.mode != "rows":
        raise ValueError(f"a weight in the rows layout runs tiles 'rows' or 'dequant', not {t.mode!r}")
    words_per_group = kw.group // (32 // kw.field)
    if kw.group and words_per_group % t.unroll and t.unroll % words_per_group:
        raise ValueError("the words per step and the words per group must divide one another")
    split = t.split_k
    if not split:
        split = 1
        while -(-n // t.bn) * m * split < _sm_count(x.device) and kwords // (split * 2) >= 4 * t.unroll:
            split *= 2
    y = accumulator(x, m, n, split, kw.outliers is not None)
    gemv_rows_kernel[(-(-n // t.bn), m, split)](
        x2, kw.words, kw.stats, bias if bias is not None else kw.stats, y, n, k, kwords, ng, x2.stride(0),
        y.stride(0), **stats, HAS_BIAS=bias is not None, BN=t.bn, BWT=t.unroll, SPLIT_K=split,
        FIELD=_field_variant(t.field or field, kw.field, x.is_cuda, fastest=2), num_warps=t.warps)
    return finish_product(x, x2, y, kw.outliers)
