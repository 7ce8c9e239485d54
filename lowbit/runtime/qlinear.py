"""QuantLinear: a linear layer that keeps packed quantized weights and dequantizes them on the fly.

On CUDA inputs, formats with a Triton kernel (lowbit.kernels) run it; weight-only codes are re-ordered once into
the kernels' layout (`prepare_kernels`, in place: the checkpoint layout is restored whenever the weights are saved
or read back). Elsewhere this is the plain-torch reference runtime: ŵ = (c − z)·s is rebuilt from the packed
codes at each call, then `F.linear`; its output equals that of an nn.Linear holding dequantize(quantize(W)).

With an activation format (w8a8, fp8), the input is quantized first (lowbit.formats.activation) and, where
the weight has one scale per output channel or tensor, the product runs on the codes (lowbit.runtime.lowp):
torch's int8 or scaled-fp8 matmul where the platform has it, else an exact emulation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import kernels
from lowbit.errors import LowbitError
from lowbit.formats import QuantizedWeight, SpQRWeight, fake_quantize_activation, from_packed, pack, packed_shapes
from lowbit.formats.spec import LayerSpec
from lowbit.runtime.lowp import codes_kind, codes_matmul, weight_operand


class QuantLinear(nn.Module):
    """Packed weight buffers (qweight/scales/qzeros, fp8 weight/weight_scale, or SpQR's grid, statistics and
    sparse outliers) plus an optional bias; `input_scale` (float32 scalar) with static activation scales.
    `outliers` is the number of stored outliers (SpQR only)."""

    def __init__(self, in_features: int, out_features: int, spec: LayerSpec, bias: bool = False,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32,
                 outliers: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.spec, self.outliers = in_features, out_features, spec, outliers
        for name, (shape, dtype) in self._buffers_spec().items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None)
        static = spec.act is not None and spec.act.static
        self.register_buffer("input_scale", torch.ones((), device=device) if static else None)
        self.kernel_layout = False  # qweight holds the kernels' layout (lowbit.kernels.layout), not the checkpoint's
        self._kw = None  # the kernels' form of the weight (lowbit.kernels.weights), with kernel_layout
        self._no_kernel = False  # this layer's weight turned out to have no kernel form (said once)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight | SpQRWeight, spec: LayerSpec,
                       bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> QuantLinear:
        out_f, in_f = qw.shape
        module = cls(in_f, out_f, spec, bias=bias is not None, device="meta",
                     outliers=qw.outliers if isinstance(qw, SpQRWeight) else 0)
        for name, tensor in qw.packed().items():
            setattr(module, name, tensor)
        if bias is not None:
            module.bias = bias.detach().clone()
        if module.input_scale is not None:
            if input_scale is None:
                raise LowbitError("this layer's activations take a static scale: calibrate one (input_scale).")
            module.input_scale = input_scale.detach().float().reshape(()).clone()
        return module

    def _buffers_spec(self) -> dict:
        return packed_shapes(self.spec.weight, (self.out_features, self.in_features), self.outliers)

    def quantized_weight(self) -> QuantizedWeight | SpQRWeight:
        tensors = {name: getattr(self, name) for name in self._buffers_spec()}
        if self.kernel_layout:
            tensors["qweight"] = self._checkpoint_qweight()
        return from_packed(self.spec.weight, self.shape, tensors)

    def prepare_kernels(self) -> bool:
        """Build the weight-only kernels' form of this layer once (lowbit.kernels.weights), its codes replacing
        `qweight` in place; False when this format has no such kernel."""
        from lowbit.kernels.weights import kernel_weight, unsupported

        if self.kernel_layout:
            return True
        if self._no_kernel or self.spec.act is not None or unsupported(self.spec.weight) is not None:
            return False
        try:
            kw = kernel_weight(self.quantized_weight())
        except ValueError as e:
            kernels.say_fallback("this layer format", str(e))
            self._no_kernel = True
            return False
        self.qweight, self._kw, self.kernel_layout = kw.words, kw, True
        return True

    def _checkpoint_qweight(self) -> torch.Tensor:
        return pack(self._kw.codes(), self.spec.weight.bits)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel_layout:
            destination[prefix + "qweight"] = self._checkpoint_qweight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._drop_kernel_form()  # what is loaded is in the checkpoint layout
        self._no_kernel = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._drop_kernel_form()  # moved or cast buffers: the kernel form is rebuilt from them when next needed
        return super()._apply(fn, *args, **kwargs)

    def _drop_kernel_form(self) -> None:
        if self.kernel_layout:
            self.qweight = self._checkpoint_qweight()
            self.kernel_layout, self._kw = False, None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def stored_bits(self) -> int:
        """Bits of the packed weight buffers (codes, scales, zeros), as stored; the bias is not counted."""
        return sum(math.prod(shape) * dtype.itemsize * 8 for shape, dtype in self._buffers_spec().values())

    def dequantized_weight(self) -> torch.Tensor:
        return self.quantized_weight().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if kernels.wanted_for(x):
            y = self._kernel_forward(x, bias)
            if y is not None:
                return y
        elif self.kernel_layout:  # kernels turned off after load: back to the checkpoint layout once, not per call
            self._drop_kernel_form()
        act = self.spec.act
        if act is not None:
            operand = self._codes_operand()
            if operand is not None:
                y = codes_matmul(x.reshape(-1, x.shape[-1]), act, self.input_scale, *operand)
                y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
                return y if bias is None else y + bias
            x = fake_quantize_activation(x, act, self.input_scale)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def _kernel_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        from lowbit.kernels.linear import unsupported, w8a8_linear, wxa16_linear

        act = self.spec.act
        reason = None
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            reason = f"{x.dtype} activations (the kernels take float16, bfloat16 or float32)"
        elif act is not None:
            operand = self._w8a8_operand()
            if operand is None:
                reason = (f"{self.spec.weight.kind} weights with {act.kind} activations (W8A8 kernels: int8 "
                          "symmetric or fp8 weights, one scale per channel or tensor)")
            else:
                return w8a8_linear(x, act, self.input_scale, *operand, bias)
        else:
            reason = unsupported(self.spec.weight, act)
        if reason is None and not self.prepare_kernels():
            return None  # said by prepare_kernels
        if reason is not None:
            kernels.say_fallback("this layer format", reason)
            return None
        return wxa16_linear(x, self._kw, bias)

    def _w8a8_operand(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The packed weight as the W8A8 kernels read it, without a copy of the codes: a symmetric 8-bit
        checkpoint's words viewed as bytes (one code each), or the fp8 codes; with the scales as float32 [1, N]."""
        kind = codes_kind(self.spec.weight, self.spec.act)
        if kind is None:
            return None
        if kind == "int8":
            codes, scale = self.qweight.view(torch.uint8).reshape(self.out_features, -1), self.scales
        else:
            codes, scale = self.weight, self.weight_scale
        key = scale.data_ptr()
        if getattr(self, "_w_scale_key", None) != key:
            self._w_scale = scale.float().reshape(1, -1)
            self._w_scale_key = key
        return codes, self._w_scale

    def _codes_operand(self):
        """The weight as a codes-matmul operand (lowbit.runtime.lowp), built once per set of buffers."""
        key = tuple(getattr(self, n).data_ptr() for n in self._buffers_spec())
        if getattr(self, "_operand_key", None) != key:
            self._operand = weight_operand(self.quantized_weight(), self.spec.act)
            self._operand_key = key
        return self._operand

    def extra_repr(self) -> str:
        w = self.spec.weight.to_dict()
        act = f", act={self.spec.act.describe()}" if self.spec.act else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={w}{act}"


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
