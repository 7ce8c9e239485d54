"""A GEMV on a second layout, word-major with the rows contiguous, to be timed against `wxa16.gemv_kernel`
(benchmarks/gpu_kernels.py --sweep); not dispatched to until it has been measured faster.

Layout ("rows"): words [KW, N] (int32), word w of row n holding the codes of columns P·w … P·w + P − 1 in its
fields (the checkpoint's own sequential order, P = 32/b fields of b = 2, 4, 8 bits), and the statistics words
transposed, [NG, N]. A thread then loads the same word of several consecutive rows in one vector load, so each
value of x is loaded and converted once for all of them, and the statistics of a group are read once per word
(once per tile when a group spans the tile) rather than once per thread that holds a slice of it.

Per code: one FMA on f = B + c (byte permute or shift-and-mask, as in wxa16), the group's zero and offset taken
out per word through Σx: y_n += s·(Σ_j f_j·x_j − (B + z)·Σ_j x_j), or with minimums s·(Σ f·x − B·Σx) + m·Σx.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lowbit.formats.packing import pack
from lowbit.kernels.epilogue import bias_and_store
from lowbit.kernels.weights import KernelWeight, Outliers, ZeroMode, field_bits
from lowbit.kernels.wxa16 import _byte_to_float, _close_group, _field_small, _split_stats, outliers_kernel


@dataclass
class RowsWeight:
    """A layer in the "rows" layout: words [KW, N], statistics words [NG, N], as `KernelWeight` otherwise."""

    words: torch.Tensor
    stats: torch.Tensor
    bits: int
    group: int
    mode: ZeroMode
    in_features: int
    out_features: int
    perm: torch.Tensor | None = None
    outliers: Outliers | None = None

    @property
    def field(self) -> int:
        return field_bits(self.bits)


def rows_weight(kw: KernelWeight) -> RowsWeight:
    """The same weight as `kw` in the rows layout."""
    words = pack(kw.codes() if kw.perm is None else kw.codes()[:, kw.perm], kw.field).T.contiguous()
    return RowsWeight(words, kw.stats.T.contiguous(), kw.bits, kw.group, kw.mode, kw.in_features, kw.out_features,
                      kw.perm, kw.outliers)


@triton.jit
def gemv_rows_kernel(x_ptr, w_ptr, st_ptr, b_ptr, y_ptr, N, K, KW, NG, stride_xm, stride_ym,
                     BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr, ZERO: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BN: tl.constexpr, BWT: tl.constexpr, SPLIT_K: tl.constexpr,
                     FIELD: tl.constexpr):
    """One program: BN outputs of one row of x over its share of K, BWT words (BWT·P columns) per step."""
    PER: tl.constexpr = 32 // BITS
    WPG: tl.constexpr = 0 if GROUP == 0 else GROUP // PER  # words per group
    TILE_STATS: tl.constexpr = GROUP == 0 or WPG >= BWT  # one group for the whole tile
    BASE: tl.constexpr = 128.0 if FIELD == 2 else float(1 << BITS)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rw = tl.arange(0, BWT)
    x_row = x_ptr + pid_m * stride_xm
    steps = tl.cdiv(KW, BWT)
    per_split = tl.cdiv(steps, SPLIT_K)
    s_lo = pid_k * per_split
    s_hi = tl.minimum(s_lo + per_split, steps)
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
        if FIELD == 2:
            lo = words & 0x0F0F0F0F
            hi = (words >> 4) & 0x0F0F0F0F
        part = tl.zeros((BWT, BN), tl.float32)
        sx = tl.zeros((BWT, 1), tl.float32)
        for j in tl.static_range(PER):
            col = w * PER + j
            x = tl.load(x_row + col, mask=col < K, other=0.0).to(tl.float32)[:, None]
            if FIELD == 2:
                if j % 2 == 0:
                    f = _byte_to_float(lo, j // 2)
                else:
                    f = _byte_to_float(hi, j // 2)
            else:
                f = _field_small(words, j, BITS)
            part += f * x
            sx += x
        acc = _close_group(acc, part, sx, s, z, BASE, MODE)
    y = tl.sum(acc, axis=0)
    bias_and_store(y, b_ptr, rn, N, y_ptr + pid_m * stride_ym + rn, rn < N, pid_k, HAS_BIAS, SPLIT_K)


def gemv_rows(x: torch.Tensor, rw: RowsWeight, bias: torch.Tensor | None, bn: int = 128, bwt: int = 16,
              split_k: int = 0, warps: int = 8, field: int = 0) -> torch.Tensor:
    """y = x · ŵᵀ (+ bias) for x [..., K] with few rows, on the rows layout; split_k 0: enough to fill the GPU."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if rw.perm is not None:
        x2 = x2.index_select(1, rw.perm)
    elif x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], rw.out_features
    kwords, ng = rw.words.shape[0], rw.stats.shape[0]
    if rw.group and (rw.group // (32 // rw.field)) % bwt and bwt % (rw.group // (32 // rw.field)):
        raise ValueError("BWT and the words per group must divide one another")
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
    if not split_k:
        split_k = 1
        while -(-n // bn) * m * split_k < sms and kwords // (split_k * 2) >= 4 * bwt:
            split_k *= 2
    if not field:
        field = 2 if rw.field == 4 and x.is_cuda else 1
    sparse = rw.outliers is not None
    if split_k > 1:
        y = torch.zeros(m, n, device=x.device, dtype=torch.float32)
    else:
        y = torch.empty(m, n, device=x.device, dtype=torch.float32 if sparse else x.dtype)
    gemv_rows_kernel[(-(-n // bn), m, split_k)](
        x2, rw.words, rw.stats, bias if bias is not None else rw.stats, y, n, k, kwords, ng, x2.stride(0),
        y.stride(0), BITS=rw.field, GROUP=rw.group, MODE=int(rw.mode), ZERO=1 << (rw.bits - 1),
        HAS_BIAS=bias is not None, BN=bn, BWT=bwt, SPLIT_K=split_k, FIELD=field, num_warps=warps)
    if sparse:
        o = rw.outliers
        outliers_kernel[(-(-n // 32), m)](x2, o.row_ptr, o.cols, o.corrections, y, n, x2.stride(0), y.stride(0),
                                          BN=32, CH=64, num_warps=4)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
