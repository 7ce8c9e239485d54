"""AWQ: activation-aware weight quantization (Lin et al., arXiv 2306.00978).

The weight channels that matter are those that see large activations (§3.1). Rather than keeping them in 16
bits, AWQ scales them up before rounding, which shrinks their relative rounding error (§3.2). For a group of
layers reading the same input X:

    s = s_X^α / sqrt(max(s_X^α)·min(s_X^α)),   s_X = mean_t |X_tj|                         (Eq. 5)
    α* = argmin_α ‖ f(X; Q(W·diag(s))·diag(s)⁻¹) − f(X; W) ‖²,   α ∈ {0, 1/20, …, 19/20}      (Eq. 4)

where f is the module the group feeds — the whole attention for q/k/v, the MLP for gate/up, the layer itself
for o_proj and down_proj (AutoAWQ's choice). s is folded into the operation before the group (lowbit.methods.
scaling), so the float model is unchanged. Then each layer's clipping range is searched per group of weights,
minimizing the output error on the same activations (not for q/k, whose errors the attention logits multiply),
and the weights are clamped to it. The layers are then rounded to nearest by the pipeline (or by GPTQ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.formats import IntFormat, PerChannel, PerGroup, fake_quantize
from lowbit.formats.grouping import grouped
from lowbit.formats.search import best_shrink
from lowbit.formats.spec import LayerSpec
from lowbit.methods.scaling import fold_masters, run_inspect, set_weights, total_squared_error
from lowbit.methods.transform import BlockScales
from lowbit.model.architectures import ScaleGroup
from lowbit.model.capture import GroupInputs

NEEDS_CALIBRATION = True
GRID = 20
CLIP_GRID, CLIP_MAX_SHRINK = 20, 0.5  # AutoAWQ: shrink the range by up to half, in steps of 1/20
NO_CLIP = ("q_proj", "k_proj", "query", "key")


@dataclass(frozen=True)
class AWQConfig:
    """AWQ's options (a recipe's `options`)."""

    awq_clip: bool = True  # search each group's clipping range on the calibration activations
    grid: int = GRID
    search_tokens: int = 16384  # calibration tokens in the scale search (whole batches, at least one)
    clip_tokens: int = 4096  # tokens (evenly spaced) in the clipping search


Config = AWQConfig


def search_scale(block: nn.Module, gi: GroupInputs, specs: dict[str, LayerSpec], masters: dict[str, torch.Tensor],
                 grid: int = GRID) -> tuple[float, torch.Tensor]:
    """(α*, s) for one scaling group by Eq. 4; the block's weights are left as they were."""
    xs = gi.x
    s_x = sum(x.float().abs().sum(dim=tuple(range(x.dim() - 1))) for x in xs) / sum(x[..., 0].numel() for x in xs)
    reference = run_inspect(block, gi)
    planned = [n for n in gi.group.layers if n in specs]
    originals = {n: masters[f"{n}.weight"] for n in gi.group.layers}
    work = {n: originals[n].to(s_x.device, torch.float32) for n in planned}  # on the compute device
    best = (float("inf"), 0.0, torch.ones_like(s_x))
    try:
        for i in range(grid):
            alpha = i / grid
            s = s_x.pow(alpha).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            set_weights(block, {n: fake_quantize(work[n] * s, specs[n].weight) / s for n in planned})
            err = total_squared_error(run_inspect(block, gi), reference)
            if err < best[0]:
                best = (err, alpha, s)
    finally:
        set_weights(block, originals)
    return best[1], best[2]


def clip_factors(weight: torch.Tensor, x: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """The shrink factors p [rows, groups] of the range, per group of the format, that minimize Σ_t ((w − ŵ)·x_t)²
    over the tokens x [T, in] with ŵ the rounding of the clamped weight; computed on x's device."""
    wg = grouped(weight.to(x.device, torch.float32), fmt.granularity)
    xg = x.float().reshape(x.shape[0], wg.shape[1], wg.shape[2])
    gram = torch.einsum("tgk,tgl->gkl", xg, xg)
    return best_shrink(wg, fmt, CLIP_GRID, CLIP_MAX_SHRINK, gram, clamp=True)


def _sample_tokens(xs: list[torch.Tensor], n: int) -> torch.Tensor:
    flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
    step = max(1, flat.shape[0] // n)
    return flat[::step][:n]


def select_groups(block: nn.Module, groups: list[ScaleGroup], cfg: AWQConfig) -> list[ScaleGroup]:
    return groups


def capture_batches(cfg: AWQConfig, tokens_per_batch: int) -> int:
    return max(1, cfg.search_tokens // max(1, tokens_per_batch))


def search(block: nn.Module, captured: list[GroupInputs], specs: dict[str, LayerSpec],
           masters: dict[str, torch.Tensor], cfg: AWQConfig) -> BlockScales:
    """Each group's (α*, s) by Eq. 4 on its float inputs, then — on the weights with every s folded in — each
    clippable layer's range (not q/k). Groups whose inspect module saw no token (an expert nobody was routed to)
    are left out. The block and `masters` are left as they were."""
    captured = [gi for gi in captured if gi.args]
    chosen = BlockScales()
    for gi in captured:
        alpha, s = search_scale(block, gi, specs, masters, cfg.grid)
        chosen.scales[gi.group.prev], chosen.alpha[gi.group.prev] = s.cpu(), alpha
    if not cfg.awq_clip:
        return chosen
    touched = {k for gi in captured for k in masters
               if k.rpartition(".")[0] in (gi.group.prev, *gi.group.layers)}
    folded = masters | {k: masters[k].clone() for k in touched}
    for gi in captured:
        fold_masters(folded, gi.group, chosen.scales[gi.group.prev])
    for gi in captured:
        x = None
        for name in gi.group.layers:
            fmt = specs[name].weight if name in specs else None
            clippable = isinstance(fmt, IntFormat) and isinstance(fmt.granularity, (PerGroup, PerChannel))
            if not clippable or name.rpartition(".")[2] in NO_CLIP:
                continue
            if x is None:
                s = chosen.scales[gi.group.prev]
                x = _sample_tokens(gi.x, cfg.clip_tokens) / s.to(gi.x[0].device, gi.x[0].dtype)
            chosen.clip[name] = clip_factors(folded[f"{name}.weight"], x, fmt).cpu()
    return chosen
