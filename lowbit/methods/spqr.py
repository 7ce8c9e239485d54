"""SpQR (Dettmers et al., arXiv 2306.03078): GPTQ in tiny groups with quantized statistics, plus sparse outliers.

The pass is GPTQ's (lowbit.methods.gptq, same Hessian H = 2XXᵀ, same upper Cholesky factor U of (H + λI)⁻¹ and
the same error feedback, paper Alg. 1), with three changes:

1. Groups of β1 input columns (default 16). When a group starts, its per-row scale and zero are fitted on the
   current (error-updated) weights and then quantized to b_s bits in groups of β2 rows — the bilevel
   statistics of §4.1; the weights are coded with the *decoded* statistics.
2. Before fitting, weights that are likely outliers are left out of the fit (§4.2, "leave-one-out"): for each
   weight, the drop in the group's error Σ_j ((w_j − q(w_j)) / U_jj)² when the grid is fitted without it. Those
   whose drop exceeds τ are replaced by the row's mean of the others while fitting.
3. After coding column j, every weight whose error ((w − q(w)) / U_jj)² exceeds τ is an outlier: it is kept in
   16 bits and contributes no error to the feedback (Alg. 1, lines 10–13).

τ is relative: the absolute threshold is τ · mean_j(Var_rows(W_:j) / U_jj²), so one τ means the same on every
layer. Instead of τ, a target outlier rate can be given; τ is then found per layer by bisection (each step is
one pass). τ = ∞ with 16-bit statistics is exactly GPTQ with asymmetric groups of β1 (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.formats.intgrid import decode, encode, grid_params
from lowbit.formats.spqr import SpQRFormat, SpQRWeight, encode_column, fit_group, to_csr
from lowbit.methods.gptq import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_DAMP,
    HessianStats,
    accumulate,
    check_stats,
    init_stats,
    prepare,
)

__all__ = ["NEEDS_CALIBRATION", "Config", "SpQRConfig", "accumulate", "init_stats", "quantize_layer",
           "spqr_quantize"]

NEEDS_CALIBRATION = True
DEFAULT_TAU = 0.2
RATE_TOLERANCE = 0.1  # relative: a found τ gives a rate within ±10% of the target
MAX_SEARCH_PASSES = 12


@dataclass(frozen=True)
class SpQRConfig:
    """SpQR's options (a recipe's `options`); the statistics' bits and β2 go into its format (SpQRFormat)."""

    block_size: int = DEFAULT_BLOCK_SIZE  # GPTQ's columns per lazy batch
    damp: float = DEFAULT_DAMP  # GPTQ's λ
    outlier_threshold: float = DEFAULT_TAU  # τ, relative (inf = no outliers)
    outlier_rate: float | None = None  # when set, τ is searched per layer to reach it (τ above is the start)
    stat_bits: int = 3  # bits of the quantized scales and zeros (16 = keep them in float16)
    stat_group: int = 16  # β2: output rows sharing one second-level grid

    def __post_init__(self) -> None:
        if not self.outlier_threshold > 0:
            raise LowbitError(f"SpQR's outlier threshold τ must be positive (inf for no outliers); got "
                              f"{self.outlier_threshold}.")
        if self.outlier_rate is not None and not 0 <= self.outlier_rate < 0.5:
            raise LowbitError(f"the target outlier rate must be in [0, 0.5), e.g. 0.01 for 1%; got "
                              f"{self.outlier_rate}.")


def leave_one_out_gain(w: torch.Tensor, u: torch.Tensor, fmt: SpQRFormat) -> torch.Tensor:
    """For a group w [rows, β1] with Cholesky diagonal u [β1]: how much the group's error drops when each weight
    is left out of the fit (and kept exactly). Returns [rows, β1]."""
    grid = fmt.weight_grid
    rows, size = w.shape
    scale, zero = grid_params(w.amin(-1), w.amax(-1), grid)
    q = decode(encode(w.unsqueeze(1), scale.unsqueeze(1), zero.unsqueeze(1), grid), scale.unsqueeze(1),
               zero.unsqueeze(1), grid).squeeze(1)
    base = ((w - q) / u).square().sum(-1, keepdim=True)
    # Range without weight k: the second smallest (largest) where k is the smallest (largest).
    srt = w.sort(-1).values
    k = torch.arange(size, device=w.device)
    lo = torch.where(k == w.argmin(-1, keepdim=True), srt[:, 1:2], srt[:, :1])
    hi = torch.where(k == w.argmax(-1, keepdim=True), srt[:, -2:-1], srt[:, -1:])
    s_k, z_k = grid_params(lo, hi, grid)  # [rows, β1]: one grid per left-out weight
    wk = w.unsqueeze(1).expand(rows, size, size)
    q_k = decode(encode(wk, s_k, z_k, grid), s_k, z_k, grid)
    err = ((wk - q_k) / u).square()
    err = err.masked_fill(torch.eye(size, dtype=torch.bool, device=w.device), 0)
    return base - err.sum(-1)


def _fit_without_likely_outliers(w: torch.Tensor, u: torch.Tensor, fmt: SpQRFormat, threshold: float):
    if math.isfinite(threshold):
        likely = leave_one_out_gain(w, u, fmt) > threshold
        if likely.any():
            keep = (~likely).float()
            mean = (w * keep).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp(min=1)
            w = torch.where(likely, mean, w)
    return fit_group(w, fmt)


def _pass(W: torch.Tensor, Hinv: torch.Tensor, fmt: SpQRFormat, threshold: float, block_size: int) -> SpQRWeight:
    """One SpQR pass over W [rows, cols] (consumed) at an absolute outlier threshold."""
    rows, cols = W.shape
    b1 = fmt.beta1
    block = max(block_size // b1, 1) * b1
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    outlier = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    kept = torch.zeros(rows, cols, dtype=torch.float32, device=W.device)
    stats = []
    diag = torch.diagonal(Hinv)
    find_outliers = math.isfinite(threshold)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if j % b1 == 0:
                s, z, coded = _fit_without_likely_outliers(W1[:, i:i + b1], diag[j:j + b1], fmt, threshold)
                stats.append((s, z, coded))
            w = W1[:, i]
            c, q = encode_column(w, s, z, fmt)
            codes[:, j] = c
            err = (w - q) / Hinv1[i, i]
            if find_outliers:
                out = err.square() > threshold
                exact = w.half().float()
                q = torch.where(out, exact, q)
                err = (w - q) / Hinv1[i, i]
                outlier[:, j], kept[:, j] = out, exact
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return SpQRWeight(fmt, codes, *_stack_stats(stats, fmt), *to_csr(outlier, kept))


def _stack_stats(stats: list, fmt: SpQRFormat):
    """Per-group statistics → scale, zero [rows, groups] and the second-level grids [rows/β2, groups, 2]."""
    if not fmt.quantized_stats:
        return (torch.stack([s for s, _, _ in stats], 1).half(), torch.stack([z for _, z, _ in stats], 1).half(),
                None, None)
    out = []
    for key in ("s", "z"):
        codes = torch.stack([c[key][0] for _, _, c in stats], 1)
        grid = torch.stack([torch.stack([c[key][1], c[key][2]], -1) for _, _, c in stats], 1)
        out += [codes, grid]
    return out[0], out[2], out[1], out[3]


def threshold_scale(W: torch.Tensor, Hinv: torch.Tensor) -> float:
    """mean_j(Var_rows(W_:j) / U_jj²): the unit in which τ is given."""
    return (W.var(0, correction=0) / torch.diagonal(Hinv).square()).mean().item()


def spqr_quantize(weight: torch.Tensor, stats: HessianStats, fmt: SpQRFormat,
                  cfg: SpQRConfig = SpQRConfig()) -> SpQRWeight:
    """Quantize weight [out, in] with SpQR given the Hessian of its inputs."""
    fmt.check_shape(tuple(weight.shape))
    W, Hinv, _, _ = prepare(weight, stats, cfg.damp)
    unit = threshold_scale(W, Hinv)
    if cfg.outlier_rate is None or cfg.outlier_rate == 0:
        tau = math.inf if cfg.outlier_rate == 0 else cfg.outlier_threshold
        return _pass(W, Hinv, fmt, tau * unit, cfg.block_size)
    return _search_rate(W, Hinv, fmt, unit, cfg)


def _search_rate(W: torch.Tensor, Hinv: torch.Tensor, fmt: SpQRFormat, unit: float, cfg: SpQRConfig) -> SpQRWeight:
    """Bisection on log τ until the outlier rate is within RATE_TOLERANCE of the target (fewest outliers beyond
    that: the best pass at or under the target is kept when the search runs out)."""
    target = cfg.outlier_rate
    lo, hi = None, None  # log τ bounds: rate too high at lo, too low at hi
    log_tau = math.log(cfg.outlier_threshold)
    best = None
    for _ in range(MAX_SEARCH_PASSES):
        result = _pass(W.clone(), Hinv, fmt, math.exp(log_tau) * unit, cfg.block_size)
        rate = result.outlier_rate
        if rate <= target and (best is None or rate > best.outlier_rate):
            best = result
        if abs(rate - target) <= RATE_TOLERANCE * target:
            return result
        if rate > target:
            lo = log_tau
        else:
            hi = log_tau
        log_tau = (lo + hi) / 2 if lo is not None and hi is not None else log_tau + (2.0 if rate > target else -2.0)
    return best if best is not None else result


Config = SpQRConfig


def quantize_layer(weight: torch.Tensor, stats: HessianStats | None, spec, cfg: SpQRConfig) -> SpQRWeight:
    check_stats(stats, "SpQR")
    if not isinstance(spec.weight, SpQRFormat):
        raise LowbitError(f"--method spqr needs an SpQR weight format; the layer's plan says "
                          f"{spec.weight.to_dict()}.")
    return spqr_quantize(weight, stats, spec.weight, cfg)
