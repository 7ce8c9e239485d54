"""Weight-only matmul on packed integer codes: y = x · ŵᵀ with ŵ = (c − z)·s rebuilt in registers (Triton).

The codes are in the kernel layout (lowbit.kernels.layout): int32 words [N, KW], a tile of BW words per row
covering BK = BW·P columns (P = 32/b, b = 2, 4, 8), field j of word w holding column j·BW + w of the tile.
Scales [N, NG] are float16; with asymmetric grids the zero points are the checkpoint's flat b-bit packing
([N·NG] codes). BW is chosen so that every slice (the BW columns of one field) lies in one group.

Dequantization per code, exact in float32 (the "magic number" conversion: 2^23 + c has c in its mantissa):
    c_f = bitcast_f32(c | 0x4B000000) − (2^23 + z) = c − z.

- `gemv_kernel` (rows of x one at a time, CUDA-core FMAs): the slices of one group are summed first,
  p = Σ_(columns of g) (c − z)·x, and the group's scale applied once: y_n = Σ_g s_n,g · p_n,g.
- `dot_kernel` (up to a few dozen rows, tensor cores): each slice is one K-step, y += x_slice · ŵ_sliceᵀ, with
  ŵ rounded to the activation dtype; K may be split across programs (fp32 atomic adds).
- `dequant_kernel` writes ŵ [N, K] in the activation dtype, for many rows, where one dequantization followed by a
  cuBLAS matmul beats rebuilding the weight in every tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels.epilogue import bias_and_store


@triton.jit
def _group_stats(s_ptr, z_ptr, rn, g, N, NG, BITS: tl.constexpr, HAS_ZERO: tl.constexpr):
    """Scale and 2^23 + z (float32, shaped like rn and g broadcast) of group g for rows rn; zero scale for padding
    past the last group."""
    ok = (rn < N) & (g < NG)
    idx = rn * NG + g
    s = tl.load(s_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    if HAS_ZERO:
        PER: tl.constexpr = 32 // BITS
        zw = tl.load(z_ptr + idx // PER, mask=ok, other=0)
        z = ((zw >> ((idx % PER) * BITS)) & ((1 << BITS) - 1)).to(tl.float32) + 8388608.0
    else:
        z = s * 0.0 + (8388608.0 + (1 << (BITS - 1)))
    return s, z


@triton.jit
def _field(words, j: tl.constexpr, BITS: tl.constexpr):
    """2^23 + c (float32, exact) for field j of every word."""
    return (((words >> (j * BITS)) & ((1 << BITS) - 1)) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, KW, NG, stride_xm, stride_ym,
                BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                BN: tl.constexpr, BW: tl.constexpr, SPLIT_K: tl.constexpr, UNROLL: tl.constexpr):
    """One program: BN outputs of one row of x, over K (or its share of K with SPLIT_K > 1, fp32 atomics).
    Each step loads UNROLL tiles at once ([UNROLL, BN, BW] words), so that many loads are in flight per thread:
    one row of x is a stream of weights, and the kernel is bound by how much of it is on its way."""
    PER: tl.constexpr = 32 // BITS
    BK: tl.constexpr = BW * PER
    # slices per group within a tile (GROUP == 0: one group per row, the scale applied at the end)
    SPG: tl.constexpr = PER if GROUP == 0 else GROUP // BW
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rw = tl.arange(0, BW)
    ru = tl.arange(0, UNROLL)
    x_row = x_ptr + pid_m * stride_xm
    tiles = tl.cdiv(K, BK)
    per_split = tl.cdiv(tiles, SPLIT_K)
    t_lo = pid_k * per_split
    t_hi = tl.minimum(t_lo + per_split, tiles)
    acc = tl.zeros((UNROLL, BN, BW), tl.float32)
    rows = rn[None, :, None]
    if GROUP == 0:
        s, z = _group_stats(s_ptr, z_ptr, rows, 0, N, NG, BITS, HAS_ZERO)
    for t0 in tl.range(t_lo, t_hi, UNROLL):
        t = t0 + ru  # [UNROLL] tiles of this step
        live = t < t_hi
        words = tl.load(w_ptr + rows * KW + (t[:, None, None] * BW + rw[None, None, :]),
                        mask=(rows < N) & live[:, None, None], other=0)
        part = tl.zeros((UNROLL, BN, BW), tl.float32)
        for j in tl.static_range(PER):
            if GROUP > 0:
                if j % SPG == 0:
                    g = (t * BK + j * BW) // GROUP
                    s, z = _group_stats(s_ptr, z_ptr, rows, g[:, None, None], N, NG, BITS, HAS_ZERO)
            col = t[:, None] * BK + j * BW + rw[None, :]
            x = tl.load(x_row + col, mask=(col < K) & live[:, None], other=0.0).to(tl.float32)
            part += (_field(words, j, BITS) - z) * x[:, None, :]
            if GROUP > 0:
                if j % SPG == SPG - 1:
                    acc += part * s
                    part = tl.zeros((UNROLL, BN, BW), tl.float32)
        if GROUP == 0:
            acc += part
    if GROUP == 0:
        acc = acc * s
    y = tl.sum(tl.sum(acc, axis=2), axis=0)
    bias_and_store(y, b_ptr, rn, N, y_ptr + pid_m * stride_ym + rn, rn < N, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def dot_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, KW, NG, stride_xm, stride_ym,
               BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr, SPLIT_K: tl.constexpr):
    """One program: a BM × BN tile of y over K (or over its share of K, with SPLIT_K > 1)."""
    PER: tl.constexpr = 32 // BITS
    BK: tl.constexpr = BW * PER
    SPG: tl.constexpr = PER if GROUP == 0 else GROUP // BW
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    pid_k = tl.program_id(2)
    rw = tl.arange(0, BW)
    tiles = tl.cdiv(K, BK)
    per_split = tl.cdiv(tiles, SPLIT_K)
    t_lo = pid_k * per_split
    t_hi = tl.minimum(t_lo + per_split, tiles)
    acc = tl.zeros((BM, BN), tl.float32)
    if GROUP == 0:
        s, z = _group_stats(s_ptr, z_ptr, rn[:, None], 0, N, NG, BITS, HAS_ZERO)
    for t in tl.range(t_lo, t_hi):
        words = tl.load(w_ptr + rn[:, None] * KW + (t * BW + rw)[None, :], mask=(rn < N)[:, None], other=0)
        for j in tl.static_range(PER):
            if GROUP > 0:
                if j % SPG == 0:
                    s, z = _group_stats(s_ptr, z_ptr, rn[:, None], (t * BK + j * BW) // GROUP, N, NG, BITS,
                                        HAS_ZERO)
            col = t * BK + j * BW + rw
            x = tl.load(x_ptr + rm[:, None] * stride_xm + col[None, :], mask=(rm[:, None] < M) & (col[None, :] < K),
                        other=0.0)
            w = ((_field(words, j, BITS) - z) * s).to(x.dtype)
            acc = tl.dot(x, tl.trans(w), acc)
    bias_and_store(acc, b_ptr, rn, N, y_ptr + rm[:, None] * stride_ym + rn[None, :],
                   (rm[:, None] < M) & (rn[None, :] < N), pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, KW, NG, BITS: tl.constexpr, GROUP: tl.constexpr,
                   HAS_ZERO: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr):
    """ŵ [N, K] = (c − z)·s in out's dtype, one BN-row tile of BK columns per program."""
    PER: tl.constexpr = 32 // BITS
    BK: tl.constexpr = BW * PER
    SPG: tl.constexpr = PER if GROUP == 0 else GROUP // BW
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    t = tl.program_id(1)
    rw = tl.arange(0, BW)
    words = tl.load(w_ptr + rn[:, None] * KW + (t * BW + rw)[None, :], mask=(rn < N)[:, None], other=0)
    if GROUP == 0:
        s, z = _group_stats(s_ptr, z_ptr, rn[:, None], 0, N, NG, BITS, HAS_ZERO)
    for j in tl.static_range(PER):
        if GROUP > 0:
            if j % SPG == 0:
                s, z = _group_stats(s_ptr, z_ptr, rn[:, None], (t * BK + j * BW) // GROUP, N, NG, BITS, HAS_ZERO)
        col = t * BK + j * BW + rw
        w = (_field(words, j, BITS) - z) * s
        tl.store(out_ptr + rn[:, None] * K + col[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=(rn[:, None] < N) & (col[None, :] < K))
