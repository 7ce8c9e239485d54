"""Layouts that lowbit quantizes as ordinary linear layers, made so once on loading (the same function, other tensors).

- Mixture-of-experts blocks: transformers keeps all experts of a block in two fused 3-D tensors, gate_up_proj
  [E, 2I, H] (gate rows first, then up) and down_proj [E, H, I]. `ExpertMLPs` holds one `Expert` (gate_proj,
  up_proj, down_proj: nn.Linear) per index instead, named `experts.{e}.gate_proj` as the original per-expert
  checkpoints were, so each expert is a layer like any other: its statistics are those of the tokens routed to it.
- GPT-2's `Conv1D` (y = x W + b, W stored [in, out]) becomes nn.Linear with W transposed.

`adapt(model)` does both in place; it runs on loading a float model, before quantizing, and before a lowbit
checkpoint's tensors are assigned (on meta tensors), so the checkpoint's names are the adapted ones.
"""

from __future__ import annotations

import torch
from torch import nn


class Expert(nn.Module):
    """One expert: down(act(gate(x)) · up(x))."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (_linear(w) for w in (gate, up, down))
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertMLPs(nn.ModuleList):
    """The experts of one block as separate modules; called as transformers' fused experts are, with the hidden
    states [T, H], each token's chosen experts [T, k] and their routing weights [T, k].

    `calibrate_all` names experts that, while statistics are gathered, also run on the tokens not routed to them
    (their output still counts for the routed tokens only): the fallback for experts that calibration rarely
    reaches (lowbit.pipeline)."""

    def __init__(self, experts: list[Expert]) -> None:
        super().__init__(experts)
        self.calibrate_all: set[int] = set()

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            pos, tok = torch.where(top_k_index.t() == e)  # slot-major, as transformers orders them
            if e in self.calibrate_all:
                y = expert(hidden_states)[tok]
            elif tok.numel():
                y = expert(hidden_states[tok])
            else:
                continue
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().clone(memory_format=torch.contiguous_format),
                                 requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer


def _is_fused_experts(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    return set(params) == {"gate_up_proj", "down_proj"} and all(p.dim() == 3 for p in params.values()) \
        and hasattr(module, "act_fn")


def split_experts(module: nn.Module) -> ExpertMLPs:
    inter = module.gate_up_proj.shape[1] // 2
    return ExpertMLPs([Expert(gu[:inter], gu[inter:], down, module.act_fn)
                       for gu, down in zip(module.gate_up_proj, module.down_proj, strict=True)])


def adapt(model: nn.Module) -> nn.Module:
    """Replace fused experts and Conv1D layers in place (a no-op on a model without them); returns the model."""
    from transformers.pytorch_utils import Conv1D

    for name, module in list(model.named_modules()):
        if _is_fused_experts(module):
            new = split_experts(module)
        elif isinstance(module, Conv1D):
            new = _linear(module.weight.t(), module.bias)
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
    return model


def expert_modules(block: nn.Module) -> dict[str, ExpertMLPs]:
    return {n: m for n, m in block.named_modules() if isinstance(m, ExpertMLPs)}
