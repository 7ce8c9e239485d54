"""The contract of a block transform (AWQ, SmoothQuant): the driver captures, the method searches, the scales apply.

A transform module provides
- `Config` (its frozen options, built from a recipe's), `select_groups(block, groups, cfg)` (which of the block's
  active scaling groups it acts on) and `capture_batches(cfg, tokens_per_batch)` (how many calibration batches its
  search needs);
- `search(block, captured, specs, masters, cfg) -> BlockScales`, pure: given the inputs the driver captured for
  each group (`GroupInputs`), it returns what it chose and leaves the block and `masters` as they were.

`apply_scales` then folds each group's s into the masters (and the block) and clamps the clipped layers. A
`BlockScales` is an artefact: the pipeline keeps one per block, `lowbit.io.scales` saves them beside the
checkpoint, and `--reuse-scales` applies saved ones instead of searching.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import IntFormat
from lowbit.formats.grouping import grouped
from lowbit.formats.search import clamp_to_range
from lowbit.formats.spec import LayerSpec
from lowbit.methods.scaling import fold, set_weights
from lowbit.model.architectures import ScaleGroup


@dataclass
class BlockScales:
    """What a transform chose for one block: per scaling group (by its prev) the scale s folded into it and the α
    that gave it; per clipped layer the shrink factors p [rows, groups] of its weight's range after folding."""

    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: dict[str, float] = field(default_factory=dict)
    clip: dict[str, torch.Tensor] = field(default_factory=dict)


def clamp_layer(weight: torch.Tensor, p: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """The weight clamped, group by group of its format, to the range shrunk by p (`clamp_to_range`)."""
    wg = grouped(weight.float(), fmt.granularity)
    if tuple(p.shape) != tuple(wg.shape[:2]):
        raise LowbitError(f"clipping factors of shape {tuple(p.shape)} do not fit a weight of {tuple(weight.shape)} "
                          f"in {fmt.granularity} ({tuple(wg.shape[:2])} expected); they were searched for another "
                          f"model or recipe. Search them again (drop --reuse-scales).")
    return clamp_to_range(wg, p.to(wg.device, wg.dtype), fmt).reshape(weight.shape)


def apply_scales(block: nn.Module, masters: dict[str, torch.Tensor], groups: list[ScaleGroup], chosen: BlockScales,
                 specs: dict[str, LayerSpec], where: str) -> None:
    """Fold each chosen s into its group, then clamp each clipped layer; changes `masters` and the block."""
    by_prev = {g.prev: g for g in groups}
    for prev, s in chosen.scales.items():
        group = by_prev.get(prev)
        width = block.get_submodule(group.layers[0]).weight.shape[1] if group else None
        if group is None or s.shape != (width,):
            raise LowbitError(f"{where}: the scales for {prev!r} ({tuple(s.shape)}) do not fit this block's scaling "
                              f"groups ({', '.join(by_prev) or 'none'}); they were searched for another model or "
                              f"another choice of layers. Search them again (drop --reuse-scales).")
        fold(block, masters, group, s)
    for name, p in chosen.clip.items():
        key = f"{name}.weight"
        if name not in specs or not isinstance(specs[name].weight, IntFormat):
            raise LowbitError(f"{where}: clipping ranges were saved for {name}, which this recipe does not quantize "
                              f"on an integer grid. Use the recipe the scales were searched with.")
        masters[key].copy_(clamp_layer(masters[key], p, specs[name].weight).to(masters[key].device))
        set_weights(block, {name: masters[key]})
