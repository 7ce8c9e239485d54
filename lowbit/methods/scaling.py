"""Per-input-channel scales folded into the operation before a group of linear layers (used by AWQ, SmoothQuant).

For layers that read X = prev(·) and a vector s > 0, dividing prev's output channel j by s_j and multiplying
column j of every layer by s_j gives (X diag(s)⁻¹)(diag(s) Wᵀ) = X Wᵀ: the float model computes the same
function (SmoothQuant Eq. 3; AWQ §3.2). Where the groups are is architecture data (Family.scaling).

The transforms work on a block's float32 master weights (`masters`: parameter name → tensor) and copy each
change into the block that runs the calibration passes (possibly on another device, in another dtype). The inputs
of each group's `inspect` module are captured by the driver (lowbit.model.capture.capture_group_inputs).
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch
from torch import nn

from lowbit.model.architectures import ScaleGroup, expand
from lowbit.model.capture import GroupInputs, squared_error


def active_groups(block: nn.Module, groups: tuple[ScaleGroup, ...], planned: set[str]) -> list[ScaleGroup]:
    """The groups made concrete for this block — `*` expanded (a group per index where prev has one), layers the
    block lacks dropped — that hold a planned layer and whose prev exists and yields exactly the layers' input
    channels (o_proj after v_proj only when attention has as many key/value heads as query heads)."""
    names = [n for n, _ in block.named_modules()]
    out = []
    for g in (c for group in groups for c in _concrete(group, names)):
        if not planned & set(g.layers) or g.prev not in names or g.inspect not in names:
            continue
        width = _output_width(block.get_submodule(g.prev), g)
        if width and all(_reads(block.get_submodule(n), width) for n in g.layers):
            out.append(g)
    return out


def _concrete(g: ScaleGroup, names: list[str]) -> list[ScaleGroup]:
    if "*" not in g.prev:
        return [replace(g, layers=tuple(expand(g.layers, names)))]
    rx = re.compile(re.escape(g.prev).replace(r"\*", r"(\d+)"))
    indices = [m.group(1) for n in names if (m := rx.fullmatch(n))]
    return [replace(g, prev=g.prev.replace("*", i), inspect=g.inspect.replace("*", i),
                    layers=tuple(expand([n.replace("*", i) for n in g.layers], names))) for i in indices]


def _output_width(prev: nn.Module, g: ScaleGroup) -> int:
    """How many channels prev hands the group (0: none that a scale can be folded into)."""
    if isinstance(prev, nn.Linear):
        n = g.prev_chunk[1] if g.prev_chunk else 1
        return prev.out_features // n if prev.out_features % n == 0 else 0
    weight = getattr(prev, "weight", None)
    return weight.numel() if isinstance(weight, torch.Tensor) and weight.dim() == 1 and not g.prev_chunk else 0


def _reads(module: nn.Module, width: int) -> bool:
    """A layer (or a router's weight) multiplying inputs of `width` channels."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == width


def run_inspect(block: nn.Module, gi: GroupInputs) -> list[torch.Tensor]:
    """The inspect module's outputs on the captured batches (the first element when it returns a tuple)."""
    module = block.get_submodule(gi.group.inspect)
    outs = []
    with torch.no_grad():
        for args, kwargs in zip(gi.args, gi.kwargs, strict=True):
            y = module(*args, **kwargs)
            outs.append(y[0] if isinstance(y, tuple) else y)
    return outs


def fold_masters(masters: dict[str, torch.Tensor], group: ScaleGroup, s: torch.Tensor) -> list[str]:
    """Divide prev's output channels by s (a norm's offset + w as a whole, the group's chunk of a fused layer's
    rows) and multiply the layers' input columns by s, in place in `masters`; returns the keys changed."""
    s = s.float()
    changed = []
    for pname in ("weight", "bias"):
        key = f"{group.prev}.{pname}"
        if key not in masters:
            continue
        t = masters[key]
        if group.prev_chunk:
            k, n = group.prev_chunk
            rows = t.shape[0] // n
            t = t[k * rows:(k + 1) * rows]
        scale = (s.view(-1, 1) if t.dim() == 2 else s).to(t.device)
        offset = group.prev_offset if pname == "weight" else 0.0
        t.add_(offset).div_(scale).sub_(offset)
        changed.append(key)
    for name in group.layers:
        key = f"{name}.weight"
        masters[key].mul_(s.view(1, -1).to(masters[key].device))
        changed.append(key)
    return changed


def fold(block: nn.Module, masters: dict[str, torch.Tensor], group: ScaleGroup, s: torch.Tensor) -> None:
    """`fold_masters` on the block's float32 masters, then the changed tensors copied into the block's parameters."""
    params = dict(block.named_parameters())
    for key in fold_masters(masters, group, s):
        p = params[key]
        if p.data.data_ptr() != masters[key].data_ptr():
            p.data = masters[key].to(p.device, p.dtype)


def set_weights(block: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Point the named layers' weights at these tensors (cast to each layer's device and dtype)."""
    for name, w in weights.items():
        p = block.get_submodule(name).weight
        p.data = w.to(p.device, p.dtype)


def total_squared_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return sum(squared_error(y, r.float()) for y, r in zip(outputs, reference, strict=True))
