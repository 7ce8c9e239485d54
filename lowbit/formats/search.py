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
    lo, hi = wg.amin(-1), wg.amax(-1)
    best_scale, best_zero = grid_params(lo, hi, fmt)
    best_err = _sq_error(wg, best_scale, best_zero, fmt)
    for i in range(1, int(max_shrink * grid) + 1):
        p = 1.0 - i / grid
        scale, zero = grid_params(p * lo, p * hi, fmt)
        err = _sq_error(wg, scale, zero, fmt)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _sq_error(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    return (decode(encode(wg, scale, zero, fmt), scale, zero, fmt) - wg).pow(2).sum(-1)
