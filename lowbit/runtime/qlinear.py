"""QuantLinear: a linear layer that keeps packed quantized weights and dequantizes them on the fly.

This is the plain-torch reference runtime (CPU and any device): ŵ = (c − z)·s is rebuilt from the packed
codes at each call, then `F.linear`. Activation formats (w8a8, fp8) quantize the input per token first.
Its output equals that of an nn.Linear holding dequantize(quantize(W)) — the fake-quantized weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats import QuantizedWeight, SpQRWeight, fake_quantize_activation, from_packed, packed_shapes
from lowbit.recipe import LayerSpec


class QuantLinear(nn.Module):
    """Packed weight buffers (qweight/scales/qzeros, fp8 weight/weight_scale, or SpQR's grid, statistics and
    sparse outliers) plus an optional bias. `outliers` is the number of stored outliers (SpQR only)."""

    def __init__(self, in_features: int, out_features: int, spec: LayerSpec, bias: bool = False,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32,
                 outliers: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.spec, self.outliers = in_features, out_features, spec, outliers
        for name, (shape, dtype) in self._buffers_spec().items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight | SpQRWeight, spec: LayerSpec,
                       bias: torch.Tensor | None = None) -> QuantLinear:
        out_f, in_f = qw.shape
        module = cls(in_f, out_f, spec, bias=bias is not None, device="meta",
                     outliers=qw.outliers if isinstance(qw, SpQRWeight) else 0)
        for name, tensor in qw.packed().items():
            setattr(module, name, tensor)
        if bias is not None:
            module.bias = bias.detach().clone()
        return module

    def _buffers_spec(self) -> dict:
        return packed_shapes(self.spec.weight, (self.out_features, self.in_features), self.outliers)

    def quantized_weight(self) -> QuantizedWeight | SpQRWeight:
        tensors = {name: getattr(self, name) for name in self._buffers_spec()}
        return from_packed(self.spec.weight, self.shape, tensors)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def stored_bits(self) -> int:
        """Bits of the packed weight buffers (codes, scales, zeros), as stored; the bias is not counted."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() * 8 for n in self._buffers_spec())

    def dequantized_weight(self) -> torch.Tensor:
        return self.quantized_weight().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.act is not None:
            x = fake_quantize_activation(x, self.spec.act)
        w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        w = self.spec.weight.to_dict()
        act = f", act={self.spec.act.kind}" if self.spec.act else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={w}{act}"


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
