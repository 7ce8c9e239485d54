"""SmoothQuant (Xiao et al., arXiv 2211.10438): move activation outliers into the weights before W8A8.

Activations have a few channels with outliers 100× the rest, which a per-token or per-tensor int8 scale cannot
absorb; weights are flat. A per-channel factor moves the difficulty from X to W (§4):

    Y = (X diag(s)⁻¹)·(diag(s) W),   s_j = max|X_j|^α / max|W_j|^(1−α)                          (Eq. 4)

with max|X_j| over the calibration tokens and max|W_j| over column j of every layer that reads X. s is folded
into the norm before the group (the paper smooths the inputs of the QKV projection and of the MLP's first
layers, the ones a norm produces; lowbit.methods.scaling), so the float model is unchanged. With `smooth_all`,
the inputs that a linear layer produces are smoothed too: down_proj's (s folded into up_proj's rows) and
o_proj's (into v_proj's, where the head shapes allow) — in Llama-style MLPs the product silu(gate)·up carries
the largest activation outliers of the block, which the paper's groups leave alone. The migration
strength α is the recipe's (the paper's default 0.5), or searched per group over {0, 0.05, …, 1}: the α whose
quantized product Q_a(X diag(s)⁻¹)·Q_w(diag(s) W)ᵀ is closest to X Wᵀ on calibration tokens.
The weights are then rounded to nearest or quantized by GPTQ (`smoothquant+gptq`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import fake_quantize, fake_quantize_activation
from lowbit.formats.activation import activation_scale
from lowbit.formats.spec import LayerSpec
from lowbit.methods.transform import BlockScales
from lowbit.model.architectures import ScaleGroup
from lowbit.model.capture import GroupInputs

NEEDS_CALIBRATION = True
ALPHA_GRID = 20  # α ∈ {0, 1/20, …, 1}
MIN_SCALE = 1e-5


@dataclass(frozen=True)
class SmoothQuantConfig:
    """SmoothQuant's options (a recipe's `options`)."""

    alpha: float | None = None  # migration strength; None: searched per group
    smooth_all: bool = False  # also the groups fed by a linear layer (down after up, o after v)
    search_tokens: int = 4096  # tokens (evenly spaced) on which the α search measures the error

    def __post_init__(self) -> None:
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise LowbitError(f"the migration strength alpha must lie in [0, 1], got {self.alpha}.")


Config = SmoothQuantConfig


def smoothing_scale(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 4, with channels that never see an activation (or have zero weights) left alone (s = 1)."""
    s = x_amax.clamp(min=MIN_SCALE).pow(alpha) / w_amax.clamp(min=MIN_SCALE).pow(1 - alpha)
    dead = (x_amax <= 0) | (w_amax <= 0)
    return torch.where(dead, torch.ones_like(s), s).clamp(min=MIN_SCALE)


def quantized_product_error(x: torch.Tensor, weights: list[torch.Tensor], specs: list[LayerSpec],
                            s: torch.Tensor) -> float:
    """‖Q_a(X/s)·Q_w(W·s)ᵀ − X·Wᵀ‖² summed over the layers (float32, on the given tokens)."""
    err = 0.0
    xs = x / s
    for w, spec in zip(weights, specs, strict=True):
        xq = xs
        if spec.act is not None:
            scale = activation_scale(xs.abs().amax(), spec.act) if spec.act.static else None
            xq = fake_quantize_activation(xs, spec.act, scale)
        wq = fake_quantize(w * s, spec.weight)
        err += (xq @ wq.t() - x @ w.t()).pow(2).sum().item()
    return err


def select_groups(block: nn.Module, groups: list[ScaleGroup], cfg: SmoothQuantConfig) -> list[ScaleGroup]:
    """The norm-fed groups (every group with `smooth_all`)."""
    return [g for g in groups if cfg.smooth_all or not isinstance(block.get_submodule(g.prev), nn.Linear)]


def capture_batches(cfg: SmoothQuantConfig, tokens_per_batch: int) -> None:
    return None  # max|X_j| over every calibration token


def search(block: nn.Module, captured: list[GroupInputs], specs: dict[str, LayerSpec],
           masters: dict[str, torch.Tensor], cfg: SmoothQuantConfig) -> BlockScales:
    """Each group's s by Eq. 4 (α the recipe's, or searched); groups whose inputs no token reached are left out."""
    chosen = BlockScales()
    for gi in (g for g in captured if g.args):
        flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in gi.x])
        x_amax = flat.abs().amax(0).float()
        layers = [n for n in gi.group.layers if n in specs]
        weights = {n: masters[f"{n}.weight"].float().to(flat.device) for n in gi.group.layers}
        w_amax = torch.stack([w.abs().amax(0) for w in weights.values()]).amax(0)
        if cfg.alpha is not None:
            alpha = cfg.alpha
        else:
            x = flat[:: max(1, flat.shape[0] // cfg.search_tokens)].float()
            planned, planned_specs = [weights[n] for n in layers], [specs[n] for n in layers]
            errors = {a / ALPHA_GRID: quantized_product_error(x, planned, planned_specs,
                                                              smoothing_scale(x_amax, w_amax, a / ALPHA_GRID))
                      for a in range(ALPHA_GRID + 1)}
            alpha = min(errors, key=errors.get)
        chosen.scales[gi.group.prev] = smoothing_scale(x_amax, w_amax, alpha).cpu()
        chosen.alpha[gi.group.prev] = alpha
    return chosen
