"""What every kernel ends with: bias of the first K share, then the store (or, with K split, the fp32 add)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bias_and_store(y, b_ptr, rn, N, out, ok, pid_k, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """y (float32; [BM, BN] or [BN]) plus the bias at columns rn (once, by the first K share), written to `out`
    in its dtype, or added into float32 `out` when K is split across programs."""
    if HAS_BIAS:
        if pid_k == 0:
            b = tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
            y += b if len(y.shape) == 1 else b[None, :]
    if SPLIT_K == 1:
        tl.store(out, y.to(out.dtype.element_ty), mask=ok)
    else:
        tl.atomic_add(out, y, mask=ok, sem="relaxed")
