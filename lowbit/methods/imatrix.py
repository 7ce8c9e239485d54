"""RTN weighted by importance, llama.cpp's "imatrix" idea: round to nearest, but choose each group's range to
minimize the importance-weighted error rather than the plain one.

The importance of input column i is the mean squared activation a_i = (1/n) Σ_t x_{t,i}² over the n
calibration tokens that reach the layer (llama-imatrix collects the same diagonal). For a layer's output,
E ‖(w − ŵ) x‖² = Σ_i a_i (w_i − ŵ_i)² when the columns of x are uncorrelated, so a group's error is weighted
by how much its columns are used. Each group then takes the shrink factor p of the range [p·lo, p·hi] (p from 1
down to 1 − MAX_SHRINK, lowbit.formats.search) with the least Σ_i a_i (w_i − ŵ_i)²; p = 1 (absmax) is a
candidate, so the weighted error is never worse than plain RTN's. The codes are then plain round-to-nearest on
that grid: on llama.cpp's block types (--scheme q4_0 …) this is what its quantizer does with an imatrix. On its
k-quants (--scheme q4_k, q4_k_m …) the sub-block fits of lowbit.formats.kquant weight each error by a_i·√(σ² + w²),
as llama.cpp's k-quant quantizers do with an imatrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.formats import IntFormat, QuantizedWeight
from lowbit.formats.granularity import PerChannel, PerGroup
from lowbit.formats.grouping import grouped
from lowbit.formats.intgrid import encode, grid_params
from lowbit.formats.kquant import KQuantFormat, KQuantWeight, quantize_k
from lowbit.formats.search import best_shrink
from lowbit.formats.spec import LayerSpec

NEEDS_CALIBRATION = True
Config = None  # no options beyond the format; the calibration set is the recipe's


@dataclass
class ImportanceStats:
    """Σ_t x_t² per input column (float64 sums, [in]) over the n calibration tokens seen so far."""

    sum_sq: torch.Tensor
    n: int = 0

    @property
    def importance(self) -> torch.Tensor:
        """a_i = mean x_i², float32 [in]."""
        return (self.sum_sq / max(self.n, 1)).float()


def init_stats(in_features: int, device: torch.device | str = "cpu") -> ImportanceStats:
    return ImportanceStats(torch.zeros(in_features, dtype=torch.float64, device=device))


def accumulate(stats: ImportanceStats, x: torch.Tensor) -> ImportanceStats:
    """Fold a batch of layer inputs x [..., in] into the sums, in place."""
    x = x.reshape(-1, x.shape[-1])
    stats.sum_sq += x.double().pow(2).sum(0)
    stats.n += x.shape[0]
    return stats


def quantize_layer(weight: torch.Tensor, stats: ImportanceStats | None, spec: LayerSpec,
                   cfg: None = None) -> QuantizedWeight | KQuantWeight:
    fmt = spec.weight
    if isinstance(fmt, KQuantFormat):  # llama.cpp's fits, each weight's error weighted by its column's importance
        _check(stats)
        return quantize_k(weight, fmt, stats.importance)
    if not isinstance(fmt, IntFormat) or fmt.g_idx or not isinstance(fmt.granularity, (PerGroup, PerChannel)):
        raise LowbitError(f"--method imatrix chooses integer grids per group or channel; {fmt.kind} weights "
                          "(or one scale per tensor) have no such grid: use --method rtn or gptq.")
    _check(stats)
    w = weight.detach().float()
    wg = grouped(w, fmt.granularity)
    imp = grouped(stats.importance.to(w.device).reshape(1, -1), fmt.granularity)[0]  # [groups, size]
    p = best_shrink(wg, fmt, importance=imp)
    scale, zero = grid_params(p * wg.amin(-1), p * wg.amax(-1), fmt)
    codes = encode(wg, scale, zero, fmt).reshape(w.shape)
    return QuantizedWeight(fmt, codes, scale, None if fmt.symmetric else zero)


def _check(stats: ImportanceStats | None) -> None:
    if stats is None or stats.n == 0:
        raise LowbitError("--method imatrix needs calibration activations for every layer it quantizes; layers "
                          "outside the decoder blocks (lm_head) are not supported yet: --ignore them.")


def weighted_error(weight: torch.Tensor, qw: QuantizedWeight, stats: ImportanceStats) -> float:
    """Σ_rows Σ_i a_i (w_i − ŵ_i)²: the objective this method minimizes per group."""
    d = weight.detach().float() - qw.dequantize().to(weight.device)
    return float((d.pow(2) * stats.importance.to(d.device)).sum())

