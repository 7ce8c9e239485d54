"""View an [out, in] weight as [rows, groups, group_size] so one scale applies per (row, group)."""

from __future__ import annotations

import torch

from lowbit.formats.granularity import Granularity, PerChannel, PerGroup, PerTensor, num_groups


def grouped(weight: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """Reshape a 2-D weight to [rows, groups, group_size] for the granularity (a view, no copy)."""
    out_f, in_f = weight.shape
    if isinstance(granularity, PerTensor):
        return weight.reshape(1, 1, out_f * in_f)
    if isinstance(granularity, PerChannel):
        return weight.reshape(out_f, 1, in_f)
    if isinstance(granularity, PerGroup):
        g = num_groups(granularity, in_f)
        return weight.reshape(out_f, g, in_f // g)
    raise TypeError(f"not a granularity: {granularity!r}")


def stats_shape(shape: tuple[int, int], granularity: Granularity) -> tuple[int, int]:
    """Shape of the scale (and zero) tensor: [rows, groups]."""
    out_f, in_f = shape
    if isinstance(granularity, PerTensor):
        return (1, 1)
    return (out_f, num_groups(granularity, in_f))
