"""Clipping search: per group, the shrunken range [p·lo, p·hi] that minimizes ‖w − ŵ‖².

This is the saturating scale choice (the "mse" observer of GPTQ's reference code and llm-compressor): a few
weights beyond the shrunken range are clamped in exchange for a finer step for all the others.
"""

from __future__ import annotations

import torch

from lowbit.formats.intgrid import IntFormat, decode, encode, grid_params

SHRINK_GRID = 100
MAX_SHRINK = 0.8


def search_range(wg: torch.Tensor, fmt: IntFormat,
                 grid: int = SHRINK_GRID, max_shrink: float = MAX_SHRINK) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for grouped weights wg [rows, groups, size] after a search over shrink factors p.

    p runs over 1, 1 − 1/grid, …, 1 − max_shrink; p = 1 (absmax) is always a candidate, so the result is
    never worse than absmax in squared error.
    """
    p = best_shrink(wg, fmt, grid, max_shrink)
    return grid_params(p * wg.amin(-1), p * wg.amax(-1), fmt)


def best_shrink(wg: torch.Tensor, fmt: IntFormat, grid: int = SHRINK_GRID, max_shrink: float = MAX_SHRINK,
                gram: torch.Tensor | None = None, clamp: bool = False,
                importance: torch.Tensor | None = None) -> torch.Tensor:
    """The shrink factor p [rows, groups] whose range [p·lo, p·hi] minimizes the group's error: ‖w − ŵ‖²;
    with `importance` (a_g per input column, [groups, size]) the weighted error Σ a·(w − ŵ)²; or with `gram`
    (C_g = Σ_t x_g x_gᵀ per group, [groups, size, size]) the output error Σ_t ((w − ŵ)·x_g)² on the tokens x
    that built it (AWQ's clipping search). With `clamp`, ŵ is the rounding of the weights clamped to the range
    (`clamp_to_range`), as AWQ stores them; else of the weights themselves on the range's grid."""
    lo, hi = wg.amin(-1), wg.amax(-1)
    best_p = torch.ones_like(lo)
    best_err = None
    for i in range(int(max_shrink * grid) + 1):
        p = torch.full_like(lo, 1.0 - i / grid)
        w = clamp_to_range(wg, p, fmt) if clamp else wg
        scale, zero = grid_params(p * lo, p * hi, fmt)
        d = decode(encode(w, scale, zero, fmt), scale, zero, fmt) - wg
        if gram is not None:
            err = torch.einsum("rgk,gkl,rgl->rg", d, gram, d)
        else:
            err = (d.pow(2) * importance).sum(-1) if importance is not None else d.pow(2).sum(-1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_p = torch.where(better, p, best_p)
    return best_p


def clamp_to_range(wg: torch.Tensor, p: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """Grouped weights clamped to the shrunken range of each group: [−p·max|w|, p·max|w|] for a symmetric grid,
    [p·lo, p·hi] otherwise. Rounding the result to nearest uses exactly grid_params(p·lo, p·hi)."""
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    if fmt.symmetric:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    p = p.unsqueeze(-1)
    return torch.maximum(torch.minimum(wg, p * hi), p * lo)
