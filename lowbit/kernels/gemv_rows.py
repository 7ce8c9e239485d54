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
from lowbit.kernels.linear import _field_variant, _sm_count, accumulator, finish_product, input_rows
from lowbit.kernels.weights import KernelWeight, Outliers, ZeroMode, field_bits
from lowbit.kernels.wxa16 import _close_group, _code_float, _nibbles, _split_stats, k_share


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
    words = pack(kw.kernel_codes(), kw.field).T.contiguous()
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
            f = _code_float(words, lo, hi, j, BITS, FIELD)
            part += f * x
            sx += x
        acc = _close_group(acc, part, sx, s, z, BASE, MODE)
    y = tl.sum(acc, axis=0)
    bias_and_store(y, b_ptr, rn, N, y_ptr + pid_m * stride_ym + rn, rn < N, pid_k, HAS_BIAS, SPLIT_K)


def gemv_rows(x: torch.Tensor, rw: RowsWeight, bias: torch.Tensor | None, bn: int = 128, bwt: int = 16,
              split_k: int = 0, warps: int = 8, field: int = 0) -> torch.Tensor:
    """y = x · ŵᵀ (+ bias) for x [..., K] with few rows, on the rows layout; split_k 0: enough to fill the GPU."""
    k = x.shape[-1]
    x2 = input_rows(x, rw.perm)
    m, n = x2.shape[0], rw.out_features
    kwords, ng = rw.words.shape[0], rw.stats.shape[0]
    words_per_group = rw.group // (32 // rw.field)
    if rw.group and words_per_group % bwt and bwt % words_per_group:
        raise ValueError("BWT and the words per group must divide one another")
    if not split_k:
        split_k = 1
        while -(-n // bn) * m * split_k < _sm_count(x.device) and kwords // (split_k * 2) >= 4 * bwt:
            split_k *= 2
    y = accumulator(x, m, n, split_k, rw.outliers is not None)
    gemv_rows_kernel[(-(-n // bn), m, split_k)](
        x2, rw.words, rw.stats, bias if bias is not None else rw.stats, y, n, k, kwords, ng, x2.stride(0),
        y.stride(0), BITS=rw.field, GROUP=rw.group, MODE=int(rw.mode), ZERO=1 << (rw.bits - 1),
        HAS_BIAS=bias is not None, BN=bn, BWT=bwt, SPLIT_K=split_k,
        FIELD=_field_variant(field, rw.field, x.is_cuda), num_warps=warps)
    return finish_product(x, x2, y, rw.outliers)
