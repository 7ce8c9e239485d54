"""GPTQ (Frantar et al., arXiv 2210.17323): quantize a layer's weight column by column, compensating the error.

For a linear layer with inputs X, the layer-wise objective is min ‖WX − ŴX‖², whose Hessian is H = 2XXᵀ
(accumulated here as a running mean over calibration tokens, float32). With H⁻¹ = (H + λI)⁻¹, λ = damp · mean
diag(H), column i is quantized and the error it leaves is spread over the columns not yet quantized:

    δ = (w_i − q(w_i)) / [H⁻¹]_ii,        W_{:, j>i} −= δ · [H⁻¹]_{i, j>i}          (paper, eq. 3 / Alg. 1)

using the upper Cholesky factor of H⁻¹ (the paper's numerically stable form) and lazy batches of `block_size`
columns, whose updates to the remaining columns are applied once per batch. With groups, a group's scale and
zero are fixed from the (already error-updated) weights when its first column comes up. Act-order processes
columns by descending diag(H); combined with groups it uses static groups (scales from the original weights, in
the original column order), so inference needs no per-column group index. It is on by default on integer grids:
on SmolLM2-135M w4 g64 it takes a fifth to two fifths off the KL of the column-order pass (BENCHMARKS.md); on
llama.cpp's super-block grids, whose statistics are fitted when a super-block's first column comes up, it is off.

On a GPU the column loop of a lazy batch is one Triton kernel (lowbit.kernels.gptq); where groups are fitted during
the pass, a batch is then one group, so that its scale is known when the kernel starts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lowbit import kernels
from lowbit.errors import LowbitError
from lowbit.formats import IntFormat, PerGroup, PerTensor, QuantizedWeight, WeightFormat
from lowbit.formats.grouping import grouped
from lowbit.formats.intgrid import grid_params
from lowbit.formats.kquant import KQuantFormat, KQuantWeight, check_shape, column_grid, fit_superblock, round_column
from lowbit.formats.search import best_shrink
from lowbit.kernels.gptq import gptq_batch

NEEDS_CALIBRATION = True
DEFAULT_BLOCK_SIZE = 128
DEFAULT_DAMP = 0.01


CLIP_GRID, CLIP_MAX_SHRINK = 50, 0.5  # the search inside GPTQ runs once per group: ranges down to half, steps of 1/50
PANEL_ROWS = 2048  # row panels of the upper triangle: at least 3, at most ~2048 rows (n=14336: 57% of n² work)
CHUNK_TOKENS = 2048  # on a GPU, 16-bit inputs: tokens per tensor-core product before it is added in float32
SIXTEEN_BIT_PRODUCTS = True  # benchmarks switch it off to time the all-float32 products


@dataclass
class HessianStats:
    """H = 2/n Σ x xᵀ over the n calibration tokens seen so far (float32, [in, in]).

    Only the panels on and above the diagonal are accumulated (`upper`; H is symmetric); `H` mirrors them.
    """

    upper: torch.Tensor
    n: int = 0

    @property
    def H(self) -> torch.Tensor:
        return self.upper.triu() + self.upper.triu(1).T


def init_stats(in_features: int, device: torch.device | str = "cpu") -> HessianStats:
    return HessianStats(torch.zeros(in_features, in_features, dtype=torch.float32, device=device))


def _panels(n: int) -> list[tuple[int, int]]:
    if n < 256:
        return [(0, n)]
    size = -(-n // max(3, -(-n // PANEL_ROWS)))
    return [(a, min(a + size, n)) for a in range(0, n, size)]


@functools.cache
def _mm_to_float32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this PyTorch multiplies 16-bit CUDA matrices into float32 (torch.mm's out_dtype, PyTorch 2.8+)."""
    a = torch.ones(16, 16, dtype=dtype, device=device)
    try:
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


def accumulate(stats: HessianStats, x: torch.Tensor) -> HessianStats:
    """Fold a batch of layer inputs x [..., in] into the running Hessian, in place (streamed; never all
    activations). Each row panel P gets H[P, P:] += 2/n · x_Pᵀ x_{P:}.

    The products are exact and the sums float32. On the CPU, and for 32-bit inputs, the products run in float32.
    On a GPU, 16-bit inputs (the model's own activations) multiply on the tensor cores, whose products of 16-bit
    numbers are exact, into float32 over `CHUNK_TOKENS` tokens at a time; each chunk is then added to H in float32.
    The chunks bound what the tensor cores' own accumulation loses. Measured on an H100 against float64 over 262,144
    tokens (BENCHMARKS.md): the chunked products' error is 1.4x float32's own, whole 16,384-token batches' 20x and
    TF32's 11x (TF32 made an 8B-shaped o_proj Hessian indefinite), and a 14336-wide Hessian takes 0.17 s instead
    of 1.18 s."""
    x = x.reshape(-1, x.shape[-1])
    total = stats.n + x.shape[0]
    stats.upper.mul_(stats.n / total)
    sixteen = SIXTEEN_BIT_PRODUCTS and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and \
        _mm_to_float32(x.device, x.dtype)
    if not sixteen:
        x = x.float()
    for a, b in _panels(x.shape[1]):
        panel = stats.upper[a:b, a:]
        if not sixteen:
            panel.addmm_(x[:, a:b].T, x[:, a:], alpha=2 / total)
            continue
        for t in range(0, x.shape[0], CHUNK_TOKENS):
            chunk = x[t:t + CHUNK_TOKENS]
            panel.add_(torch.mm(chunk[:, a:b].T, chunk[:, a:], out_dtype=torch.float32), alpha=2 / total)
    stats.n = total
    return stats


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's options (a recipe's `options`)."""

    block_size: int = DEFAULT_BLOCK_SIZE  # columns per lazy batch
    damp: float = DEFAULT_DAMP  # λ, a fraction of the mean Hessian diagonal
    act_order: bool | None = None  # columns by descending Hessian diagonal; None: on, except on super-block grids

    @property
    def ordered_on_int_grids(self) -> bool:
        """Whether integer grids are visited in act-order (static groups): unless act_order is False."""
        return self.act_order is not False

    def __post_init__(self) -> None:
        if self.block_size < 1 or not 0 <= self.damp < 1:
            raise LowbitError(f"GPTQ needs a block size ≥ 1 and 0 ≤ damp < 1; got {self.block_size}, {self.damp}.")


Config = GPTQConfig


def _params(w: torch.Tensor, fmt: IntFormat, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero [rows, groups] for weights w [rows, groups, size], by absmax or the clipping search; the
    search weighs each column's error by its importance [groups, size] (diag H: the imatrix of lowbit.methods.
    imatrix, up to a constant), so the range it keeps is the one the layer's output needs."""
    if not fmt.clip:
        return grid_params(w.amin(-1), w.amax(-1), fmt)
    p = best_shrink(w, fmt, CLIP_GRID, CLIP_MAX_SHRINK, importance=importance)
    return grid_params(p * w.amin(-1), p * w.amax(-1), fmt)


def prepare(weight: torch.Tensor, stats: HessianStats, damp: float,
            act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (float32 copy, dead columns zeroed, permuted), the upper Cholesky factor of (H + λI)⁻¹, the column
    permutation (descending diag(H) with act-order, else the identity) and diag(H) before dampening, in the
    original column order; λ = damp · mean diag(H)."""
    W = weight.detach().float().clone()
    cols = W.shape[1]
    H = stats.H.to(W.device, torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    diag = torch.diag(H).clone()
    perm = torch.argsort(diag, descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, device=W.device)
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise LowbitError("GPTQ's Hessian is not positive definite even after dampening; raise --damp (e.g. 0.1) or "
                          "use more calibration samples.") from None
    return W, Hinv, perm, diag


def gptq_quantize(weight: torch.Tensor, stats: HessianStats, fmt: WeightFormat,
                  cfg: GPTQConfig = GPTQConfig()) -> QuantizedWeight:
    """Quantize weight [out, in] given the Hessian of its inputs; codes come back in the original column order."""
    if isinstance(fmt, KQuantFormat):
        return gptq_superblocks(weight, stats, fmt, cfg)
    if not isinstance(fmt, IntFormat):
        raise LowbitError("GPTQ quantizes onto integer grids; use --method rtn (or fp8) for fp8 weights.")
    group = fmt.granularity.size if isinstance(fmt.granularity, PerGroup) else None
    if group is not None and weight.shape[1] % group:
        raise LowbitError(f"group size {group} does not divide the input dimension {weight.shape[1]}.")
    act_order = cfg.ordered_on_int_grids
    W, Hinv, perm, diag = prepare(weight, stats, cfg.damp, act_order)
    rows, cols = W.shape
    scale = zero = None
    if group is None or act_order:
        # Known before the pass: per tensor/channel (from the original weights, as the paper), or static groups.
        scale, zero = _params(grouped(W[:, torch.argsort(perm)], fmt.granularity), fmt,
                              grouped(diag.expand(rows, -1), fmt.granularity)[0])
    else:
        scale = torch.zeros(rows, cols // group, dtype=torch.float16, device=W.device)
        zero = torch.zeros(rows, cols // group, dtype=torch.float16 if fmt.float_zero else torch.uint8,
                           device=W.device)
    static = scale is not None and group is not None and act_order
    fused = W.is_cuda and kernels.enabled()
    # A block holds whole groups, so a group's scale is set from fully updated weights when it starts; the kernel
    # takes a batch's scales when it starts, so groups fitted during the pass make batches of one group there.
    block = max(cfg.block_size // group, 1) * group if group else cfg.block_size
    if fused and group is not None and not static:
        block = group

    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    order = perm.tolist()  # host copy: no device sync per column
    if static:  # each permuted column's group statistics, gathered once
        gidx = perm // group
        S_all, Z_all = scale.float()[:, gidx], zero.float()[:, gidx]
    elif group is None:
        s_i, z_i = scale.float()[:, 0].expand(rows), zero.float()[:, 0].expand(rows)
    qmax = float(fmt.qmax)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        # each column's scale and zero: codes are recovered from them and the quantized columns after the batch
        S1, Z1 = (S_all[:, i1:i2], Z_all[:, i1:i2]) if static else (torch.empty_like(W1), torch.empty_like(W1))
        if group is None:
            S1[:], Z1[:] = s_i.unsqueeze(1), z_i.unsqueeze(1)
        if fused:
            if group is not None and not static:
                _fit_group(W1, 0, order[i1], group, fmt, diag, scale, zero, S1, Z1)
            Err1 = gptq_batch(W1, Hinv1, S1, Z1, 1 / torch.diag(Hinv1), qmax, fmt.float_zero)
        else:
            inv_diag = (1 / torch.diag(Hinv1)).tolist()
            Err1 = torch.zeros_like(W1)
            for i in range(i2 - i1):
                col = order[i1 + i]  # this column's index in the original order
                if static:
                    s_i, z_i = S_all[:, i1 + i], Z_all[:, i1 + i]
                elif group is not None and col % group == 0:
                    s_i, z_i = _fit_group(W1, i, col, group, fmt, diag, scale, zero, S1, Z1)
                w = W1[:, i]
                if fmt.float_zero:  # ŵ = c·s + m
                    q = (w - z_i).div_(s_i).round_().clamp_(0, qmax).mul_(s_i).add_(z_i)
                else:  # ŵ = (c − z)·s
                    q = (w / s_i).round_().add_(z_i).clamp_(0, qmax).sub_(z_i).mul_(s_i)
                err = (w - q).mul_(inv_diag[i])
                W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)  # column i itself becomes q
                Err1[:, i] = err
        c = (W1 - Z1).div_(S1) if fmt.float_zero else (W1 / S1).add_(Z1)
        codes[:, order[i1:i2]] = c.round_().clamp_(0, qmax).to(torch.uint8)
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)
    return QuantizedWeight(fmt, codes, scale, None if fmt.symmetric else zero)


def _fit_group(W1: torch.Tensor, i: int, col: int, group: int, fmt: IntFormat, diag: torch.Tensor,
               scale: torch.Tensor, zero: torch.Tensor, S1: torch.Tensor, Z1: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and zero of the group starting at batch column i (original column col), from the weights as the
    pass left them: stored, spread over the group's columns of S1 and Z1, and returned (float32 [rows])."""
    s, z = _params(W1[:, i:i + group].unsqueeze(1), fmt, diag[col:col + group].unsqueeze(0))
    scale[:, col // group], zero[:, col // group] = s[:, 0], z[:, 0]
    s_i, z_i = s[:, 0].float(), z[:, 0].float()
    S1[:, i:i + group], Z1[:, i:i + group] = s_i.unsqueeze(1), z_i.unsqueeze(1)
    return s_i, z_i


def gptq_superblocks(weight: torch.Tensor, stats: HessianStats, fmt: KQuantFormat,
                     cfg: GPTQConfig = GPTQConfig()) -> KQuantWeight:
    """GPTQ onto a llama.cpp k-quant (or IQ4_NL) grid: when the pass reaches a super-block, its two-level statistics
    are fitted (lowbit.formats.kquant.fit_superblock) from the weights as the earlier columns' updates left them,
    then each of its columns is rounded on that grid and its error spread as above."""
    if cfg.act_order:
        raise LowbitError("GPTQ with --act-order visits columns out of order, but a llama.cpp super-block's "
                          "statistics are fitted when its first column comes up: drop --act-order (on these grids "
                          "the default is column order).")
    check_shape(weight.shape, fmt)
    W, Hinv, _, diag = prepare(weight, stats, cfg.damp)
    rows, cols = W.shape
    sb = fmt.superblock
    block = max(cfg.block_size // sb, 1) * sb
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    fitted: list[dict] = []
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        inv_diag = (1 / torch.diag(Hinv1)).tolist()
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if (i1 + i) % sb == 0:
                imp = diag[i1 + i:i1 + i + sb].unsqueeze(0)  # the super-block's imatrix weights its fits
                fitted.append(fit_superblock(W1[:, i:i + sb].unsqueeze(1), fmt, imp))
                grid = column_grid(fmt, fitted[-1])
            q, codes[:, i1 + i] = round_column(W1[:, i], fmt, grid, (i1 + i) % sb)
            err = (W1[:, i] - q).mul_(inv_diag[i])
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            Err1[:, i] = err
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)
    return KQuantWeight(fmt, codes, {k: torch.cat([g[k] for g in fitted], dim=1).reshape(rows, -1)
                                     for k in fitted[0]})


def quantize_shared(weights: list[torch.Tensor], stats: HessianStats, spec, cfg: GPTQConfig) -> list[QuantizedWeight]:
    """Layers fed the same input (q/k/v, gate/up) share H; GPTQ treats rows independently, so their weights are
    stacked and quantized in one pass (fewer, larger column updates) and split again. Per-tensor scales would
    couple the layers, so those go one by one."""
    if isinstance(spec.weight, IntFormat) and isinstance(spec.weight.granularity, PerTensor):
        return [quantize_layer(w, stats, spec, cfg) for w in weights]
    check_stats(stats)
    stacked = gptq_quantize(torch.cat([w.detach() for w in weights]), stats, spec.weight, cfg)
    return stacked.split_rows([w.shape[0] for w in weights])


def check_stats(stats: HessianStats | None, method: str = "GPTQ") -> None:
    """Refuse a layer without calibration statistics (one outside the decoder blocks, e.g. lm_head)."""
    if stats is None or stats.n == 0:
        raise LowbitError(f"{method} needs calibration statistics for every layer it quantizes; layers outside the "
                          f"decoder blocks (lm_head) are not supported yet: --ignore them or use --method rtn.")


def quantize_layer(weight: torch.Tensor, stats: HessianStats | None, spec, cfg: GPTQConfig) -> QuantizedWeight:
    check_stats(stats)
    return gptq_quantize(weight, stats, spec.weight, cfg)
