"""Weight-only matmul on packed integer codes: y = x · ŵᵀ with ŵ = (c − z)·s rebuilt in registers (Triton).

The weight stays in the checkpoint's own layout (lowbit.formats.packing): qweight [N, K·b/32] int32 holding
P = 32/b codes of consecutive input columns per word (b = 2, 4, 8), scales [N, K/G] float16, and for asymmetric
grids the zero points packed flat at b bits ([N·K/G] codes). Nothing is repacked, so nothing is stored twice.

A tile of words [BN, BW] is loaded once (wide, coalesced loads) and broadcast against the P shifts into codes
[BN, BW, P], which meet the activations loaded as [BW, P] (contiguous): no reshape on the GEMV path.

Dequantization per code, exact in float32 (the "magic number" conversion: 2^23 + c has c in its mantissa):
    f = bitcast_f32(c | 0x4B000000) − (2^23 + z) = c − z.

- `gemv_kernel` (one row of x, CUDA-core FMAs): Σ_j (c − z)·x is summed within each word, and the word's scale
  applied once per word, y_n = Σ_w s_n,g(w) · Σ_j (c_nwj − z)·x_(Pw+j).
- `dot_kernel` (any M, tensor cores): ŵ = (c − z)·s is rounded to the activation dtype, and y += x · ŵᵀ.
- `dequant_kernel` writes ŵ [N, K] in the activation dtype, for large M where one dequantization followed by a
  cuBLAS matmul beats rebuilding the weight in every tile.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _stats_at(s_ptr, z_ptr, idx, ok, BITS: tl.constexpr, HAS_ZERO: tl.constexpr):
    """Scale and 2^23 + z (float32) at flat statistic indices idx (row · NG + group)."""
    s = tl.load(s_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    if HAS_ZERO:
        PER: tl.constexpr = 32 // BITS
        zw = tl.load(z_ptr + idx // PER, mask=ok, other=0)
        z = ((zw >> ((idx % PER) * BITS)) & ((1 << BITS) - 1)).to(tl.float32) + 8388608.0
    else:
        z = s * 0.0 + (8388608.0 + (1 << (BITS - 1)))
    return s, z


@triton.jit
def _stats(s_ptr, z_ptr, rn, rw, k0, N, NG, GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
           PER_TILE: tl.constexpr):
    """Scale and 2^23 + z for rows rn and the words rw of the tile starting at column k0: [BN, 1] when one group
    covers the whole tile (PER_TILE), else [BN, BW] (one per word)."""
    PER: tl.constexpr = 32 // BITS
    if PER_TILE:
        g = k0 * 0
        if GROUP > 0:
            g = k0 // GROUP
        s, z = _stats_at(s_ptr, z_ptr, (rn * NG + g)[:, None], (rn < N)[:, None], BITS, HAS_ZERO)
    else:
        g = (rw * PER) // GROUP
        s, z = _stats_at(s_ptr, z_ptr, rn[:, None] * NG + g[None, :], (rn[:, None] < N) & (g[None, :] < NG), BITS,
                         HAS_ZERO)
    return s, z


@triton.jit
def _unpacked(words, z, BITS: tl.constexpr):
    """c − z (float32, exact) for every code of every word: [BN, BW] words → [BN, BW, P], z broadcast per word."""
    PER: tl.constexpr = 32 // BITS
    shifts = tl.arange(0, PER) * BITS
    c = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return (c | 0x4B000000).to(tl.float32, bitcast=True) - z[:, :, None]


@triton.jit
def _x_tile(x_ptr, rows, M, rw, K, PER: tl.constexpr):
    """Activations [len(rows), BW, P] for the columns of words rw (contiguous loads)."""
    kx = rw[:, None] * PER + tl.arange(0, PER)[None, :]
    return tl.load(x_ptr + rows[:, None, None] + kx[None, :, :], mask=(rows < M)[:, None, None] &
                   (kx < K)[None, :, :], other=0.0)


@triton.jit
def gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, KW, NG, stride_xm, stride_ym,
                BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                BN: tl.constexpr, BW: tl.constexpr):
    """One program: BN outputs of one row of x, over the whole of K."""
    PER: tl.constexpr = 32 // BITS
    BK: tl.constexpr = BW * PER
    PER_TILE: tl.constexpr = GROUP == 0 or GROUP >= BK
    pid_m = tl.program_id(1)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    acc = tl.zeros((BN, BW), tl.float32)
    for k0 in tl.range(0, K, BK):
        rw = k0 // PER + tl.arange(0, BW)
        words = tl.load(w_ptr + rn[:, None] * KW + rw[None, :], mask=(rn[:, None] < N) & (rw[None, :] < KW),
                        other=0)
        s, z = _stats(s_ptr, z_ptr, rn, rw, k0, N, NG, GROUP, BITS, HAS_ZERO, PER_TILE)
        # x broadcast over the BN rows in the load itself: the 3-D tile then keeps each word's P codes in one
        # thread (the reduction over P stays in registers)
        x = _x_tile(x_ptr + pid_m * stride_xm, rn * 0, 1, rw, K, PER).to(tl.float32)
        acc += tl.sum(_unpacked(words, z, BITS) * x, axis=2) * s
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + pid_m * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def dot_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, KW, NG, stride_xm, stride_ym,
               BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr, SPLIT_K: tl.constexpr):
    """One program: a BM × BN tile of y over K (or over its share of K, with SPLIT_K > 1)."""
    PER: tl.constexpr = 32 // BITS
    BK: tl.constexpr = BW * PER
    PER_TILE: tl.constexpr = GROUP == 0 or GROUP >= BK
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    pid_k = tl.program_id(2)
    k_chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BK) * BK
    k_lo = pid_k * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, K)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in tl.range(k_lo, k_hi, BK):
        rw = k0 // PER + tl.arange(0, BW)
        words = tl.load(w_ptr + rn[:, None] * KW + rw[None, :], mask=(rn[:, None] < N) & (rw[None, :] < KW),
                        other=0)
        s, z = _stats(s_ptr, z_ptr, rn, rw, k0, N, NG, GROUP, BITS, HAS_ZERO, PER_TILE)
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0)
        w = tl.reshape((_unpacked(words, z, BITS) * s[:, :, None]).to(x.dtype), (BN, BK))
        acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    ok = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        tl.atomic_add(out, acc, mask=ok, sem="relaxed")


@triton.jit
def dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, KW, NG, BITS: tl.constexpr, GROUP: tl.constexpr,
                   HAS_ZERO: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr):
    """ŵ [N, K] = (c − z)·s in out's dtype, one BN × (BW·P) tile per program."""
    PER: tl.constexpr = 32 // BITS
    BK: tl.constexpr = BW * PER
    PER_TILE: tl.constexpr = GROUP == 0 or GROUP >= BK
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    rw = k0 // PER + tl.arange(0, BW)
    words = tl.load(w_ptr + rn[:, None] * KW + rw[None, :], mask=(rn[:, None] < N) & (rw[None, :] < KW), other=0)
    s, z = _stats(s_ptr, z_ptr, rn, rw, k0, N, NG, GROUP, BITS, HAS_ZERO, PER_TILE)
    w = _unpacked(words, z, BITS) * s[:, :, None]
    kx = rw[:, None] * PER + tl.arange(0, PER)[None, :]
    tl.store(out_ptr + rn[:, None, None] * K + kx[None, :, :], w.to(out_ptr.dtype.element_ty),
             mask=(rn < N)[:, None, None] & (kx < K)[None, :, :])
