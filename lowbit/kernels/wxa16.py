"""Weight-only matmul on packed integer codes: y = x · ŵᵀ with ŵ rebuilt in registers (Triton).

The codes are in the kernel layout (lowbit.kernels.layout): int32 words [N, KW], a tile of BW words per row
covering BK = BW·P columns (P = 32/b, fields of b = 2, 4, 8 bits), field j of word w holding column j·BW + w of the
tile. BW is chosen so that every slice (the BW columns of one field) lies in one group and a tile holds whole
groups. Each (row, group) has one statistics word [N, NG] (lowbit.kernels.weights): float16 s in the low half,
float16 z or m in the high half, read as MODE says (lowbit.kernels.weights.ZeroMode):

    MODE 0  ŵ = (c − z)·s, z = ZERO        MODE 1  ŵ = (c − z)·s        MODE 2  ŵ = c·s + m

Every code is made exact in float32 by writing it into the mantissa of a float ("magic number" conversion):
bitcast_f32(c | 0x4B000000) = 2^23 + c, used by the tensor-core and dequantizing kernels. The GEMV, whose speed
is the number of instructions per code, places the code at the top of the mantissa instead (2^b + c, or 128 + c by
one byte permute) and multiplies that float by x directly.

- `gemv_kernel` (rows of x one at a time, CUDA-core FMAs): per code one FMA, p = Σ (B + c)·x over the group's
  columns, and per group y_n += s·(p − (B + z)·Σx), or s·(p − B·Σx) + m·Σx with minimums; Σx is shared by every
  row.
- `dot_kernel` (up to a few dozen rows, tensor cores): each slice is one K-step, y += x_slice · ŵ_sliceᵀ, with
  ŵ rounded to the activation dtype; K may be split across programs (fp32 atomic adds).
- `dequant_kernel` writes ŵ [N, K] in the activation dtype, for many rows, where one dequantization followed by a
  cuBLAS matmul beats rebuilding the weight in every tile.
- `outliers_kernel` adds SpQR's sparse part, Σ_(outliers of row n) δ·x_c, to a float32 y.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels.epilogue import bias_and_store

MAGIC = tl.constexpr(8388608.0)  # 2^23


@triton.jit
def _split_stats(v, MODE: tl.constexpr, ZERO: tl.constexpr):
    """(s, z or m) in float32 from statistics words v (float16 halves)."""
    s = (v & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    if MODE == 0:
        z = s * 0.0 + ZERO
    else:
        z = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return s, z


@triton.jit
def k_share(steps, pid_k, SPLIT_K: tl.constexpr):
    """The steps [lo, hi) of K that program pid_k of SPLIT_K takes."""
    per_split = tl.cdiv(steps, SPLIT_K)
    lo = pid_k * per_split
    return lo, tl.minimum(lo + per_split, steps)


@triton.jit
def _group_stats(st_ptr, rn, g, N, NG, MODE: tl.constexpr, ZERO: tl.constexpr):
    """(s, z) of group g for rows rn (broadcast together); zero scale past the last group or row."""
    v = tl.load(st_ptr + rn * NG + g, mask=(rn < N) & (g < NG), other=0)
    return _split_stats(v, MODE, ZERO)


@triton.jit
def _field(words, j: tl.constexpr, BITS: tl.constexpr):
    """2^23 + c (float32, exact) for field j of every word."""
    return (((words >> (j * BITS)) & ((1 << BITS) - 1)) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _field_small(words, j: tl.constexpr, BITS: tl.constexpr):
    """2^BITS + c (float32, exact) for field j: the code moved to the top of the mantissa (bits 23 − BITS …
    22) under the exponent of 2^BITS, so that a sum of such values times x keeps its low bits."""
    SH: tl.constexpr = 23 - BITS - j * BITS
    if SH > 0:
        v = words << SH
    elif SH < 0:
        v = words >> (-SH)
    else:
        v = words
    return ((v & (((1 << BITS) - 1) << (23 - BITS))) | ((127 + BITS) << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _byte_to_float(src, magic, k: tl.constexpr):
    """128 + byte k of src (float32, exact for bytes < 128), one PRMT: the byte becomes bits 16–23 under the 0x43
    of magic = 0x43000000."""
    if k == 0:
        v = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7044;", "=r,r,r", [src, magic], dtype=tl.int32,
                                      is_pure=True, pack=1)
    elif k == 1:
        v = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7144;", "=r,r,r", [src, magic], dtype=tl.int32,
                                      is_pure=True, pack=1)
    elif k == 2:
        v = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7244;", "=r,r,r", [src, magic], dtype=tl.int32,
                                      is_pure=True, pack=1)
    else:
        v = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7344;", "=r,r,r", [src, magic], dtype=tl.int32,
                                      is_pure=True, pack=1)
    return v.to(tl.float32, bitcast=True)


@triton.jit
def _nibbles(words, FIELD: tl.constexpr):
    """For the byte-permute variants (FIELD 2, 3) the words' low and high nibbles, each in the low half of a byte;
    else the words themselves (unused)."""
    if FIELD >= 2:
        return words & 0x0F0F0F0F, (words >> 4) & 0x0F0F0F0F
    return words, words


@triton.jit
def _magic(N, FIELD: tl.constexpr):
    """The exponent word 0x43000000 of the byte permute. FIELD 3 computes it from N (N ≥ 0, so N >> 31 is 0), which
    ptxas cannot fold: it then keeps the word in a register and the permute's selector as an immediate, where
    with a literal it folds the word in and re-materializes the selector into a register before every permute."""
    if FIELD == 3:
        return (N >> 31) | 0x43000000
    return (N & 0) | 0x43000000


@triton.jit
def _code_float(words, lo, hi, j: tl.constexpr, BITS: tl.constexpr, FIELD: tl.constexpr, magic):
    """B + c (float32, exact) for field j: 128 + c by one byte permute of the nibbles (FIELD 2 and 3, 4-bit fields;
    magic from `_magic`), or 2^b + c by shift and mask."""
    if FIELD >= 2:
        if j % 2 == 0:
            return _byte_to_float(lo, magic, j // 2)
        return _byte_to_float(hi, magic, j // 2)
    return _field_small(words, j, BITS)


@triton.jit
def _weight(f, s, z, MODE: tl.constexpr):
    """ŵ (float32) from f = 2^23 + c and the group's (s, z)."""
    if MODE == 2:
        return (f - MAGIC) * s + z
    else:
        return ((f - MAGIC) - z) * s


@triton.jit
def _close_group(acc, part, sx, s, z, BASE: tl.constexpr, MODE: tl.constexpr):
    """acc + the group's Σ ŵ·x from part = Σ (BASE + c)·x and sx = Σ x: s·(part − (BASE + z)·sx), or with
    minimums s·(part − BASE·sx) + m·sx."""
    if MODE == 2:
        return acc + (part - BASE * sx) * s + z * sx
    else:
        return acc + (part - (z + BASE) * sx) * s


@triton.jit
def gemv_kernel(x_ptr, w_ptr, st_ptr, b_ptr, y_ptr, N, K, KW, NG, stride_xm, stride_ym,
                BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr, ZERO: tl.constexpr,
                HAS_BIAS: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr, SPLIT_K: tl.constexpr,
                UNROLL: tl.constexpr, FIELD: tl.constexpr):
    """One program: BN outputs of one row of x, over K (or its share of K with SPLIT_K > 1, fp32 atomics).
    Each step loads UNROLL tiles at once ([UNROLL, BN, BW] words), so that many loads are in flight per thread:
    one row of x is a stream of weights, and the kernel is bound by how much of it is on its way.

    FIELD, how a code becomes a float: 1, 2^b + c by a shift and a mask (`_field_small`); 2 (4-bit codes on a
    GPU), 128 + c by one byte permute per code after splitting the word's low and high nibbles (`_byte_to_float`);
    3, the same with the permute's exponent word in a register (`_magic`).
    Per code that is one FMA, part += f·x; the group's zero point and the offset are taken out once per group
    through Σx (`_close_group`)."""
    PER: tl.constexpr = 32 // BITS
    BK: tl.constexpr = BW * PER
    # slices per group within a tile (GROUP == 0: one group per row, the statistics applied at the end)
    SPG: tl.constexpr = PER if GROUP == 0 else GROUP // BW
    BASE: tl.constexpr = 128.0 if FIELD >= 2 else float(1 << BITS)
    magic = _magic(N, FIELD)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rw = tl.arange(0, BW)
    ru = tl.arange(0, UNROLL)
    x_row = x_ptr + pid_m * stride_xm
    tiles = tl.cdiv(K, BK)
    t_lo, t_hi = k_share(tiles, pid_k, SPLIT_K)
    acc = tl.zeros((UNROLL, BN, BW), tl.float32)
    rows = rn[None, :, None]
    if GROUP == 0:
        s, z = _group_stats(st_ptr, rows, 0, N, NG, MODE, ZERO)
    part = tl.zeros((UNROLL, BN, BW), tl.float32)
    sx = tl.zeros((UNROLL, 1, BW), tl.float32)
    for t0 in tl.range(t_lo, t_hi, UNROLL):
        t = t0 + ru  # [UNROLL] tiles of this step
        live = t < t_hi
        words = tl.load(w_ptr + rows * KW + (t[:, None, None] * BW + rw[None, None, :]),
                        mask=(rows < N) & live[:, None, None], other=0)
        lo, hi = _nibbles(words, FIELD)
        for j in tl.static_range(PER):
            if GROUP > 0:
                if j % SPG == 0:
                    g = (t * BK + j * BW) // GROUP
                    s, z = _group_stats(st_ptr, rows, g[:, None, None], N, NG, MODE, ZERO)
            col = t[:, None] * BK + j * BW + rw[None, :]
            x = tl.load(x_row + col, mask=(col < K) & live[:, None], other=0.0).to(tl.float32)[:, None, :]
            f = _code_float(words, lo, hi, j, BITS, FIELD, magic)
            part += f * x
            sx += x
            if GROUP > 0:
                if j % SPG == SPG - 1:
                    acc = _close_group(acc, part, sx, s, z, BASE, MODE)
                    part = tl.zeros((UNROLL, BN, BW), tl.float32)
                    sx = tl.zeros((UNROLL, 1, BW), tl.float32)
    if GROUP == 0:
        acc = _close_group(acc, part, sx, s, z, BASE, MODE)
    y = tl.sum(tl.sum(acc, axis=2), axis=0)
    bias_and_store(y, b_ptr, rn, N, y_ptr + pid_m * stride_ym + rn, rn < N, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def dot_kernel(x_ptr, w_ptr, st_ptr, b_ptr, y_ptr, M, N, K, KW, NG, stride_xm, stride_ym,
               BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr, ZERO: tl.constexpr,
               HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr, SPLIT_K: tl.constexpr):
    """One program: a BM × BN tile of y over K (or over its share of K, with SPLIT_K > 1)."""
    PER: tl.constexpr = 32 // BITS
    BK: tl.constexpr = BW * PER
    SPG: tl.constexpr = PER if GROUP == 0 else GROUP // BW
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    pid_k = tl.program_id(2)
    rw = tl.arange(0, BW)
    tiles = tl.cdiv(K, BK)
    t_lo, t_hi = k_share(tiles, pid_k, SPLIT_K)
    acc = tl.zeros((BM, BN), tl.float32)
    if GROUP == 0:
        s, z = _group_stats(st_ptr, rn[:, None], 0, N, NG, MODE, ZERO)
    for t in tl.range(t_lo, t_hi):
        words = tl.load(w_ptr + rn[:, None] * KW + (t * BW + rw)[None, :], mask=(rn < N)[:, None], other=0)
        for j in tl.static_range(PER):
            if GROUP > 0:
                if j % SPG == 0:
                    s, z = _group_stats(st_ptr, rn[:, None], (t * BK + j * BW) // GROUP, N, NG, MODE, ZERO)
            col = t * BK + j * BW + rw
            x = tl.load(x_ptr + rm[:, None] * stride_xm + col[None, :], mask=(rm[:, None] < M) & (col[None, :] < K),
                        other=0.0)
            w = _weight(_field(words, j, BITS), s, z, MODE).to(x.dtype)
            if x.dtype == tl.float32:  # float32 activations: an exact product, not TF32
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
    bias_and_store(acc, b_ptr, rn, N, y_ptr + rm[:, None] * stride_ym + rn[None, :],
                   (rm[:, None] < M) & (rn[None, :] < N), pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def dequant_kernel(w_ptr, st_ptr, out_ptr, N, K, KW, NG, BITS: tl.constexpr, GROUP: tl.constexpr,
                   MODE: tl.constexpr, ZERO: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr):
    """ŵ [N, K] in out's dtype, one BN-row tile of BK columns per program."""
    PER: tl.constexpr = 32 // BITS
    BK: tl.constexpr = BW * PER
    SPG: tl.constexpr = PER if GROUP == 0 else GROUP // BW
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    t = tl.program_id(1)
    rw = tl.arange(0, BW)
    words = tl.load(w_ptr + rn[:, None] * KW + (t * BW + rw)[None, :], mask=(rn < N)[:, None], other=0)
    if GROUP == 0:
        s, z = _group_stats(st_ptr, rn[:, None], 0, N, NG, MODE, ZERO)
    for j in tl.static_range(PER):
        if GROUP > 0:
            if j % SPG == 0:
                s, z = _group_stats(st_ptr, rn[:, None], (t * BK + j * BW) // GROUP, N, NG, MODE, ZERO)
        col = t * BK + j * BW + rw
        w = _weight(_field(words, j, BITS), s, z, MODE)
        tl.store(out_ptr + rn[:, None] * K + col[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=(rn[:, None] < N) & (col[None, :] < K))


@triton.jit
def outliers_kernel(x_ptr, ptr_ptr, col_ptr, d_ptr, y_ptr, N, stride_xm, stride_ym, BN: tl.constexpr,
                    CH: tl.constexpr):
    """y[m, n] += Σ δ·x[m, c] over the outliers (c, δ) of rows n of one BN-row block: each row's run of the CSR
    arrays read CH at a time, all BN rows side by side ([BN, CH] gathers), as long as the block's longest row."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    m = tl.program_id(1)
    ok = rn < N
    start = tl.load(ptr_ptr + rn, mask=ok, other=0)
    end = tl.load(ptr_ptr + rn + 1, mask=ok, other=0)
    longest = tl.max(end - start, axis=0)
    acc = tl.zeros((BN,), tl.float32)
    for i in tl.range(0, longest, CH):
        idx = start[:, None] + i + tl.arange(0, CH)[None, :]
        live = idx < end[:, None]
        c = tl.load(col_ptr + idx, mask=live, other=0).to(tl.int32) & 0xFFFF
        d = tl.load(d_ptr + idx, mask=live, other=0.0)
        acc += tl.sum(d * tl.load(x_ptr + m * stride_xm + c, mask=live, other=0.0).to(tl.float32), axis=1)
    tl.atomic_add(y_ptr + m * stride_ym + rn, acc, mask=ok, sem="relaxed")
