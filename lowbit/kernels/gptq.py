"""GPTQ's inner loop in one kernel: a lazy batch of columns rounded one by one, each error spread to the rest.

GPTQ (Frantar et al. 2023, Algorithm 1) visits the columns of W in order; for column i of a batch,

    q_i = quant(w_i),   e_i = (w_i − q_i) / [H⁻¹]_ii,   W[:, i:] −= e_i · H⁻¹[i, i:]   (H⁻¹: upper Cholesky factor)

and after the batch the later columns get one matrix product (lowbit.methods.gptq). Rows are independent, so a
program owns a tile of rows and keeps the batch's columns in registers for the whole loop: one launch per batch
instead of about ten small ones per column, which is what the loop costs in PyTorch on a GPU.

The rounding is the reference's, operation for operation (IEEE division, ties to even); the spreading is a fused
multiply-add, so a weight can differ from the reference's in its last bit and, rarely, a code by one step.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path (lowbit.methods.gptq's loop) needs none of this
    triton = None

ROWS = 32  # rows per program


if triton is not None:

    @triton.jit
    def _gptq_batch(W, Err, S, Z, H, D, rows, ncols, stride_w, stride_e, stride_s, stride_h, qmax,
                    FLOAT_ZERO: tl.constexpr, BR: tl.constexpr, BB: tl.constexpr):
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        c = tl.arange(0, BB)
        rmask, cmask = r < rows, c < ncols
        tile = rmask[:, None] & cmask[None, :]
        w = tl.load(W + r[:, None] * stride_w + c[None, :], mask=tile, other=0.0)
        err = tl.zeros([BR, BB], dtype=tl.float32)
        for i in range(0, ncols):
            here = (c == i)[None, :]
            wi = tl.sum(tl.where(here, w, 0.0), axis=1)
            s = tl.load(S + r * stride_s + i, mask=rmask, other=1.0)
            z = tl.load(Z + r * stride_s + i, mask=rmask, other=0.0)
            # to the nearest integer, ties to even: 1.5·2^23 + v lands on the integer grid; v is first kept within
            # a step of the codes' range (|v| ≪ 2^22), which does not change the clamped code
            if FLOAT_ZERO:  # ŵ = c·s + m
                v = tl.minimum(tl.maximum(tl.div_rn(wi - z, s), -1.0), qmax + 1.0)
                code = tl.minimum(tl.maximum((v + 12582912.0) - 12582912.0, 0.0), qmax)
                q = code * s + z
            else:  # ŵ = (c − z)·s
                v = tl.minimum(tl.maximum(tl.div_rn(wi, s), -z - 1.0), qmax - z + 1.0)
                code = tl.minimum(tl.maximum((v + 12582912.0) - 12582912.0 + z, 0.0), qmax)
                q = (code - z) * s
            e = (wi - q) * tl.load(D + i)
            h = tl.load(H + i * stride_h + c, mask=cmask & (c >= i), other=0.0)
            w = w - e[:, None] * h[None, :]
            err = tl.where(here, e[:, None], err)
        tl.store(W + r[:, None] * stride_w + c[None, :], w, mask=tile)
        tl.store(Err + r[:, None] * stride_e + c[None, :], err, mask=tile)


def gptq_batch(W1: torch.Tensor, Hinv1: torch.Tensor, S1: torch.Tensor, Z1: torch.Tensor, inv_diag: torch.Tensor,
               qmax: float, float_zero: bool) -> torch.Tensor:
    """Round the columns of W1 [rows, n] (float32, in place: each becomes its quantized value) with per-weight scale
    S1 and zero Z1 [rows, n], spreading errors through Hinv1 [n, n]; returns the scaled errors E [rows, n]."""
    rows, n = W1.shape
    err = torch.empty_like(W1)
    S1, Z1, Hinv1 = S1.contiguous(), Z1.contiguous(), Hinv1.contiguous()
    _gptq_batch[(triton.cdiv(rows, ROWS),)](
        W1, err, S1, Z1, Hinv1, inv_diag.contiguous(), rows, n, W1.stride(0), err.stride(0), S1.stride(0),
        Hinv1.stride(0), float(qmax), FLOAT_ZERO=float_zero, BR=ROWS, BB=triton.next_power_of_2(n), num_warps=4)
    return err


def reference_batch(W1: torch.Tensor, Hinv1: torch.Tensor, S1: torch.Tensor, Z1: torch.Tensor,
                    inv_diag: torch.Tensor, qmax: float, float_zero: bool) -> torch.Tensor:
    """gptq_batch in plain PyTorch, column by column (lowbit.methods.gptq's loop): what the kernel is checked
    against."""
    err = torch.zeros_like(W1)
    d = inv_diag.tolist()
    for i in range(W1.shape[1]):
        w, s, z = W1[:, i], S1[:, i], Z1[:, i]
        if float_zero:
            q = (w - z).div_(s).round_().clamp_(0, qmax).mul_(s).add_(z)
        else:
            q = (w / s).round_().add_(z).clamp_(0, qmax).sub_(z).mul_(s)
        e = (w - q).mul_(d[i])
        W1[:, i:].addr_(e, Hinv1[i, i:], alpha=-1)
        err[:, i] = e
    return err


def _codes(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, float_zero: bool) -> torch.Tensor:
    return ((w - z) / s).round() if float_zero else (w / s + z).round()


def check(device: str = "cpu", seed: int = 0) -> list[tuple[str, float, float, bool]]:
    """The kernel against the reference on random batches: (case, share of codes that differ, largest relative
    difference of the errors, ok)."""
    out = []
    g = torch.Generator().manual_seed(seed)
    for rows, n, float_zero, qmax in ((70, 128, False, 15.0), (33, 100, True, 7.0), (64, 17, False, 3.0)):
        W = torch.randn(rows, n, generator=g)
        A = torch.randn(n, n, generator=g)
        H = A @ A.T / n + 0.1 * torch.eye(n)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        amax = W.abs().amax(1, keepdim=True).expand(rows, n)
        if float_zero:
            S, Z = (2 * amax / qmax).contiguous(), (-amax).contiguous()
        else:
            S, Z = (2 * amax / qmax).contiguous(), torch.full((rows, n), (qmax + 1) // 2)
        D = 1 / torch.diag(Hinv)
        Wr, Wk = W.clone(), W.clone().to(device)
        er = reference_batch(Wr, Hinv, S, Z, D, qmax, float_zero)
        ek = gptq_batch(Wk, Hinv.to(device), S.to(device), Z.to(device), D.to(device), qmax, float_zero).cpu()
        differ = float((_codes(Wk.cpu(), S, Z, float_zero) != _codes(Wr, S, Z, float_zero)).float().mean())
        rel = float((ek - er).abs().max() / er.abs().max())
        out.append((f"{rows}x{n} {'float zero' if float_zero else 'int zero'} qmax {qmax:g}", differ, rel,
                    differ <= 0.002 and rel < 1e-3))
    return out
