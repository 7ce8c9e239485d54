"""W8A8 on the GPU: y = (X_q · W_qᵀ) ⊙ (s_x · s_wᵀ), int8 × int8 → int32 or fp8 × fp8 → float32 on tensor cores.

- `quantize_rows_kernel` turns x [M, K] into codes and one float32 scale per row in one pass (dynamic per-token
  scales: s = max|x_row| / Q, Q = 127 or 448), or codes only with a given per-tensor scale (static, or the dynamic
  per-tensor scale computed by torch beforehand). Rounding matches lowbit.formats.activation: x / s correctly
  rounded, then to the nearest code (ties to even).
- `scaled_mm_kernel` multiplies the codes on tensor cores and applies both scales (and the bias) in the epilogue,
  writing y in the activation dtype; for fp8 `torch._scaled_mm` (cuBLASLt, the same epilogue) is the alternative
  benchmarks/gpu_kernels.py measures against it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels.epilogue import bias_and_store


@triton.jit
def quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, QMAX: tl.constexpr, IS_FP8: tl.constexpr,
                         STATIC: tl.constexpr, BK: tl.constexpr):
    """One program per row: (optional) amax, scale, codes."""
    LO: tl.constexpr = -QMAX if IS_FP8 else -QMAX - 1.0
    row = tl.program_id(0)
    cols = tl.arange(0, BK)
    x_row = x_ptr + row * stride_xm
    if STATIC:
        s = tl.load(s_ptr)
    else:
        amax = tl.zeros((BK,), tl.float32)
        for k0 in tl.range(0, K, BK):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        s = tl.maximum(tl.div_rn(tl.max(amax, axis=0), QMAX), 1.1754943508222875e-38)
        tl.store(s_ptr + row, s)
    for k0 in tl.range(0, K, BK):
        ok = k0 + cols < K
        v = tl.div_rn(tl.load(x_row + k0 + cols, mask=ok, other=0.0).to(tl.float32), s)
        v = tl.minimum(tl.maximum(v, LO), QMAX)
        if IS_FP8:
            q = v.to(tl.float8e4nv)
        else:
            # to the nearest integer, ties to even: 1.5·2^23 + v lands on the integer grid (|v| ≤ 128 ≪ 2^22)
            q = ((v + 12582912.0) - 12582912.0).to(tl.int8)
        tl.store(q_ptr + row * K + k0 + cols, q, mask=ok)


@triton.jit
def scaled_mm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, y_ptr, M, N, K, stride_bn, stride_ym,
                     SA_ROWS: tl.constexpr, SB_COLS: tl.constexpr, B_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                     SPLIT_K: tl.constexpr):
    """y [M, N] = (A [M, K] · B [N, K]ᵀ) · s_a · s_b (+ bias); s_a per row or one, s_b per column or one.
    B_OFFSET: B holds the checkpoint's unsigned 8-bit codes c (the bytes of its packed words), value c − 128.
    SPLIT_K > 1: each program takes a share of K and adds its scaled partial product into y (float32)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m, grid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    # grouped ordering: GROUP_M row blocks share each column block while it is in L2
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    IS_INT: tl.constexpr = a_ptr.dtype.element_ty == tl.int8
    ACC: tl.constexpr = tl.int32 if IS_INT else tl.float32
    ZERO: tl.constexpr = 0 if IS_INT else 0.0
    acc = tl.zeros((BM, BN), ACC)
    k_chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BK) * BK
    for k0 in tl.range(pid_k * k_chunk, tl.minimum(pid_k * k_chunk + k_chunk, K), BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=(rm[:, None] < M) & (k0 + rk[None, :] < K),
                    other=ZERO)
        b = tl.load(b_ptr + rn[:, None] * stride_bn + (k0 + rk)[None, :],
                    mask=(rn[:, None] < N) & (k0 + rk[None, :] < K), other=ZERO)
        if B_OFFSET:
            b = (b ^ 0x80).to(tl.int8, bitcast=True)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=ACC)
    sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0) if SA_ROWS else tl.load(sa_ptr + rm * 0)
    sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0) if SB_COLS else tl.load(sb_ptr + rn * 0)
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    bias_and_store(y, bias_ptr, rn, N, y_ptr + rm[:, None] * stride_ym + rn[None, :],
                   (rm[:, None] < M) & (rn[None, :] < N), pid_k, HAS_BIAS, SPLIT_K)
