"""A quantized weight as a value: format, codes, scales, zeros; quantize, dequantize, pack, count bits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.formats.fp8 import FP8_DTYPE, FP8Format, fp8_decode, fp8_encode, fp8_scale
from lowbit.formats.fp8 import SCALE_DTYPE as FP8_SCALE
from lowbit.formats.grouping import grouped, stats_shape
from lowbit.formats.intgrid import SCALE_DTYPE as INT_SCALE
from lowbit.formats.intgrid import IntFormat, decode, encode, grid_params
from lowbit.formats.kquant import KQuantFormat, KQuantWeight, quantize_k
from lowbit.formats.kquant import packed_shapes as k_packed_shapes
from lowbit.formats.packing import pack, packed_length, unpack
from lowbit.formats.search import search_range
from lowbit.formats.spqr import SpQRFormat, SpQRWeight, spqr_packed_shapes

WeightFormat = IntFormat | FP8Format | SpQRFormat | KQuantFormat


def format_from_dict(d: dict) -> WeightFormat:
    kind = d.get("kind")
    if kind == "int":
        return IntFormat.from_dict(d)
    if kind == "fp8":
        return FP8Format.from_dict(d)
    if kind == "spqr":
        return SpQRFormat.from_dict(d)
    if kind == "ggml":
        return KQuantFormat.from_dict(d)
    raise LowbitError(f"unknown weight format {d!r}: expected kind 'int', 'fp8', 'spqr' or 'ggml'.")


@dataclass
class QuantizedWeight:
    """Codes [out, in] (uint8 for integer grids, float8 for fp8), scale and zero [rows, groups].

    `zero` is None for symmetric and fp8 formats (the zero point is implicit). `g_idx` [in] (int32), for formats
    with `g_idx`, maps each input column to its group (GPTQ act-order checkpoints); otherwise groups are
    consecutive columns.
    """

    fmt: WeightFormat
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """ŵ in float32, shape [out, in]."""
        if isinstance(self.fmt, FP8Format):
            cg = grouped(self.codes, self.fmt.granularity)
            return fp8_decode(cg, self.scale.unsqueeze(-1)).reshape(self.shape)
        zero = self.zero if self.zero is not None else _implicit_zero(self.scale, self.fmt)
        if self.g_idx is not None:  # one "group" per column, its statistics gathered through the map
            g = self.g_idx.long()
            return decode(self.codes.unsqueeze(-1), self.scale[:, g], zero[:, g], self.fmt).reshape(self.shape)
        return decode(grouped(self.codes, self.fmt.granularity), self.scale, zero, self.fmt).reshape(self.shape)

    def packed(self) -> dict[str, torch.Tensor]:
        """The tensors that are stored: what a checkpoint holds and the runtime module keeps."""
        if isinstance(self.fmt, FP8Format):
            return {"weight": self.codes, "weight_scale": self.scale}
        out = {"qweight": pack(self.codes, self.fmt.bits), "scales": self.scale}
        if self.fmt.float_zero:
            out["zeros"] = self.zero
        elif self.zero is not None:
            out["qzeros"] = pack(self.zero.reshape(-1), self.fmt.bits)
        if self.g_idx is not None:
            out["g_idx"] = self.g_idx
        return out

    @classmethod
    def from_packed(cls, fmt: WeightFormat, shape: tuple[int, int],
                    tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        if isinstance(fmt, FP8Format):
            return cls(fmt, tensors["weight"], tensors["weight_scale"])
        scale = tensors["scales"]
        codes = unpack(tensors["qweight"], fmt.bits, shape[1])
        zero = tensors.get("zeros")
        if "qzeros" in tensors:
            zero = unpack(tensors["qzeros"], fmt.bits, scale.numel()).reshape(scale.shape)
        return cls(fmt, codes, scale, zero, tensors.get("g_idx"))

    def split_rows(self, sizes: list[int]) -> list[QuantizedWeight]:
        """The weights of layers whose rows were stacked into this one (per-row statistics only)."""
        if self.scale.shape[0] != self.codes.shape[0]:
            raise LowbitError("only per-channel or per-group weights can be split by rows.")
        zeros = self.zero.split(sizes) if self.zero is not None else [None] * len(sizes)
        return [QuantizedWeight(self.fmt, c, s, z, self.g_idx)
                for c, s, z in zip(self.codes.split(sizes), self.scale.split(sizes), zeros, strict=True)]

    def stored_bits(self) -> int:
        """Every stored bit: packed codes (with padding), scales and zeros."""
        return sum(t.numel() * t.element_size() * 8 for t in self.packed().values())

    def bits_per_weight(self) -> float:
        return self.stored_bits() / self.codes.numel()


def packed_shapes(fmt: WeightFormat, shape: tuple[int, int],
                  outliers: int = 0) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of the packed tensors without quantizing anything (for building on meta); SpQR layers
    also need their number of stored outliers."""
    if isinstance(fmt, SpQRFormat):
        return spqr_packed_shapes(fmt, shape, outliers)
    if isinstance(fmt, KQuantFormat):
        return k_packed_shapes(fmt, shape)
    rows, groups = stats_shape(shape, fmt.granularity)
    if isinstance(fmt, FP8Format):
        return {"weight": (shape, FP8_DTYPE), "weight_scale": ((rows, groups), FP8_SCALE)}
    out = {"qweight": ((shape[0], packed_length(shape[1], fmt.bits)), torch.int32),
           "scales": ((rows, groups), INT_SCALE)}
    if fmt.float_zero:
        out["zeros"] = ((rows, groups), INT_SCALE)
    elif not fmt.symmetric:
        out["qzeros"] = ((packed_length(rows * groups, fmt.bits),), torch.int32)
    if fmt.g_idx:
        out["g_idx"] = ((shape[1],), torch.int32)
    return out


def from_packed(fmt: WeightFormat, shape: tuple[int, int],
                tensors: dict[str, torch.Tensor]) -> QuantizedWeight | SpQRWeight | KQuantWeight:
    """The quantized weight held by a layer's packed tensors, whatever its format."""
    if isinstance(fmt, SpQRFormat):
        return SpQRWeight.from_packed(fmt, shape, tensors)
    if isinstance(fmt, KQuantFormat):
        return KQuantWeight.from_packed(fmt, shape, tensors)
    return QuantizedWeight.from_packed(fmt, shape, tensors)


def quantize(weight: torch.Tensor, fmt: WeightFormat) -> QuantizedWeight | KQuantWeight:
    """Round-to-nearest quantization of a 2-D weight [out, in] to `fmt` (scales by absmax or clip search; llama.cpp's
    fits for its k-quants)."""
    if weight.dim() != 2:
        raise LowbitError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}.")
    if not torch.isfinite(weight).all():
        raise LowbitError("the weight contains NaN or Inf values; a quantized grid cannot represent them. "
                          "Check the checkpoint (a failed conversion or a diverged fine-tune).")
    if isinstance(fmt, SpQRFormat):
        raise LowbitError("SpQR needs calibration data: use --method spqr, not round-to-nearest.")
    if isinstance(fmt, KQuantFormat):
        return quantize_k(weight, fmt)
    w = weight.detach().float()
    wg = grouped(w, fmt.granularity)
    if isinstance(fmt, FP8Format):
        scale = fp8_scale(wg.abs().amax(-1))
        return QuantizedWeight(fmt, fp8_encode(wg, scale.unsqueeze(-1)).reshape(w.shape), scale)
    if fmt.clip:
        scale, zero = search_range(wg, fmt)
    else:
        scale, zero = grid_params(wg.amin(-1), wg.amax(-1), fmt)
    codes = encode(wg, scale, zero, fmt).reshape(w.shape)
    return QuantizedWeight(fmt, codes, scale, None if fmt.symmetric else zero)


def fake_quantize(weight: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """dequantize(quantize(w)) in float32."""
    return quantize(weight, fmt).dequantize()


def _implicit_zero(scale: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    return torch.full_like(scale, 2 ** (fmt.bits - 1), dtype=torch.uint8)


