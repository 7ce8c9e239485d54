"""SpQR's stored representation (Dettmers et al., arXiv 2306.03078, §4.2): a dense b_w-bit grid in tiny groups
whose statistics are themselves quantized, plus a sparse set of outliers kept in 16 bits.

Weights: each row's β1 consecutive input columns share an asymmetric scale s and zero z, ŵ = (c − z)·s with
c ∈ [0, 2^b_w − 1]. Statistics (bilevel): for each column group, the scales of β2 consecutive rows are quantized
to b_s bits on a min-max grid with a float16 step and minimum, s ≈ c_s·a_s + m_s; zeros likewise with b_z bits.
With 16-bit statistics, s and z are kept in float16 instead (no second level).
Outliers: CSR by row — int32 row pointers, 16-bit column indices, float16 values; ŵ at those positions is the
stored value.

Average bits per weight (paper, §4.2), for an [m, n] layer with r_o outliers per weight:

    b_w + (b_s + b_z)/β1 + 64/(β1·β2) + 32·r_o

(64 = the float16 step and minimum of the scales' and of the zeros' second-level grids). What is stored adds
the row pointers, 32·(m + 1) bits, and the padding of the last 32-code word.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.formats.granularity import PerGroup, divisors
from lowbit.formats.intgrid import SCALE_DTYPE, IntFormat, decode, encode, grid_params
from lowbit.formats.packing import pack, packed_length, unpack

UNQUANTIZED_STATS = 16  # statistics bits meaning "keep s and z in float16"


@dataclass(frozen=True)
class SpQRFormat:
    """b_w-bit weights in groups of β1 columns, b_s-bit statistics in groups of β2 rows, sparse 16-bit outliers."""

    bits: int
    beta1: int = 16
    beta2: int = 16
    stat_bits: int = 3

    kind = "spqr"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise LowbitError(f"SpQR weights have 2 to 8 bits; got {self.bits!r}.")
        if self.stat_bits != UNQUANTIZED_STATS and not 2 <= self.stat_bits <= 8:
            raise LowbitError(f"SpQR statistics have 2 to 8 bits, or 16 to keep them in float16; got "
                              f"{self.stat_bits!r}.")
        if self.beta1 < 1 or self.beta2 < 1:
            raise LowbitError(f"SpQR group sizes must be positive; got β1={self.beta1}, β2={self.beta2}.")

    @property
    def granularity(self) -> PerGroup:
        return PerGroup(self.beta1)

    @property
    def weight_grid(self) -> IntFormat:
        return IntFormat(self.bits, symmetric=False, granularity=PerGroup(self.beta1))

    @property
    def stat_grid(self) -> IntFormat:
        return IntFormat(self.stat_bits, symmetric=False, zero_point="float")

    @property
    def quantized_stats(self) -> bool:
        return self.stat_bits != UNQUANTIZED_STATS

    def check_shape(self, shape: tuple[int, int]) -> None:
        rows, cols = shape
        if cols % self.beta1:
            raise LowbitError(f"SpQR's β1 = {self.beta1} (--group-size) does not divide the input dimension {cols}; "
                              f"sizes that do: {', '.join(map(str, divisors(cols)[:12]))}.")
        if self.quantized_stats and rows % self.beta2:
            raise LowbitError(f"SpQR's β2 = {self.beta2} does not divide the output dimension {rows}; sizes that do: "
                              f"{', '.join(map(str, divisors(rows)[:12]))}.")
        if cols > 65536:
            raise LowbitError(f"SpQR stores outlier columns in 16 bits; an input dimension of {cols} is too large.")

    def estimated_bits(self, outlier_rate: float) -> float:
        """The paper's estimate b_w + (b_s + b_z)/β1 + 64/(β1·β2) + 32·r_o (no second level at 16-bit stats)."""
        second = 64 / (self.beta1 * self.beta2) if self.quantized_stats else 0.0
        return self.bits + 2 * self.stat_bits / self.beta1 + second + 32 * outlier_rate

    def to_dict(self) -> dict:
        return {"kind": "spqr", "bits": self.bits, "beta1": self.beta1, "beta2": self.beta2,
                "stat_bits": self.stat_bits}

    @classmethod
    def from_dict(cls, d: dict) -> SpQRFormat:
        return cls(int(d["bits"]), int(d["beta1"]), int(d["beta2"]), int(d["stat_bits"]))


def quantize_stats(values: torch.Tensor, fmt: SpQRFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second level: values [rows] (one column group's scales or zeros) → codes [rows], step and min
    [rows/β2] (float16), on a b_s-bit min-max grid per β2 consecutive rows."""
    v = values.float().reshape(-1, 1, fmt.beta2)
    step, low = grid_params(v.amin(-1), v.amax(-1), fmt.stat_grid)
    codes = encode(v, step, low, fmt.stat_grid)
    return codes.reshape(-1), step.reshape(-1), low.reshape(-1)


def dequantize_stats(codes: torch.Tensor, step: torch.Tensor, low: torch.Tensor, fmt: SpQRFormat) -> torch.Tensor:
    """Inverse of `quantize_stats` for any leading shape: codes [..., rows], step/min [..., rows/β2]."""
    c = codes.reshape(*codes.shape[:-1], -1, fmt.beta2)
    return decode(c, step, low, fmt.stat_grid).reshape(codes.shape)


def fit_group(w: torch.Tensor, fmt: SpQRFormat) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
    """Scale and zero [rows] (float32, what the weights are coded with) for one column group w [rows, β1].

    First level: GPTQ's asymmetric min-max grid (float16 scale, integer zero). With quantized statistics the two
    are then coded on the second-level grid and the decoded values used; the codes come back in the dict.
    """
    scale, zero = grid_params(w.amin(-1), w.amax(-1), fmt.weight_grid)
    if not fmt.quantized_stats:
        return scale.float(), zero.float(), None
    s_codes, s_step, s_low = quantize_stats(scale.float(), fmt)
    z_codes, z_step, z_low = quantize_stats(zero.float(), fmt)
    s = dequantize_stats(s_codes, s_step, s_low, fmt)
    z = dequantize_stats(z_codes, z_step, z_low, fmt)
    return s, z, {"s": (s_codes, s_step, s_low), "z": (z_codes, z_step, z_low)}


def encode_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: SpQRFormat):
    """Codes [rows] and ŵ [rows] of one column with per-row (decoded) scale and zero.

    Decoded zeros are not integers, so codes are round(w/s + z), not round(w/s) + z; with 16-bit statistics the
    zero is GPTQ's integer one and the integer grid's own encoding is used (identical to GPTQ, ties included).
    """
    grid = fmt.weight_grid
    s, z = scale.reshape(-1, 1), zero.reshape(-1, 1)
    if fmt.quantized_stats:
        codes = torch.round(w.reshape(-1, 1) / s + z).clamp(0, grid.qmax).to(torch.uint8)
    else:
        codes = encode(w.reshape(-1, 1, 1), s, z, grid).reshape(-1, 1)
    return codes.reshape(-1), decode(codes.reshape(-1, 1, 1), s, z, grid).reshape(-1)


@dataclass
class SpQRWeight:
    """Codes [out, in] (uint8); statistics per (row, column group); outliers as CSR.

    Quantized statistics: `scale`/`zero` hold codes [out, in/β1] (uint8) and `scale_grid`/`zero_grid` the
    second-level step and minimum [out/β2, in/β1, 2] (float16). 16-bit statistics: `scale`/`zero` are float16
    and the grids are None.
    """

    fmt: SpQRFormat
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    scale_grid: torch.Tensor | None
    zero_grid: torch.Tensor | None
    row_ptr: torch.Tensor  # int32 [out + 1]
    col_idx: torch.Tensor  # int16 [nnz] (read as unsigned)
    values: torch.Tensor  # float16 [nnz]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def outliers(self) -> int:
        return self.values.numel()

    @property
    def outlier_rate(self) -> float:
        return self.outliers / self.codes.numel()

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded scale and zero [out, in/β1] in float32."""
        if self.scale_grid is None:
            return self.scale.float(), self.zero.float()
        return self._decode(self.scale, self.scale_grid), self._decode(self.zero, self.zero_grid)

    def _decode(self, codes: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        per_group = codes.T  # [groups, rows]: one second-level grid per β2 rows of a column group
        g = grid.permute(1, 0, 2)  # [groups, rows/β2, 2]
        return dequantize_stats(per_group, g[..., 0], g[..., 1], self.fmt).T

    def dense_outliers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Outlier mask [out, in] and the values at those positions (float32)."""
        rows, cols = self.shape
        counts = self.row_ptr[1:].long() - self.row_ptr[:-1].long()
        r = torch.repeat_interleave(torch.arange(rows, device=counts.device), counts)
        c = self.col_idx.long() & 0xFFFF
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=self.codes.device)
        mask[r, c] = True
        dense = torch.zeros(rows, cols, dtype=torch.float32, device=self.codes.device)
        dense[r, c] = self.values.float()
        return mask, dense

    def dequantize(self) -> torch.Tensor:
        """ŵ in float32 [out, in]: the dense grid, with outliers written over it."""
        rows, cols = self.shape
        s, z = self.statistics()
        g = self.codes.reshape(rows, cols // self.fmt.beta1, self.fmt.beta1)
        w = decode(g, s, z, self.fmt.weight_grid).reshape(rows, cols)
        mask, dense = self.dense_outliers()
        return torch.where(mask, dense, w)

    def packed(self) -> dict[str, torch.Tensor]:
        out = {"qweight": pack(self.codes, self.fmt.bits)}
        if self.scale_grid is None:
            out |= {"scales": self.scale, "zeros": self.zero}
        else:
            sb = self.fmt.stat_bits
            out |= {"qscales": pack(self.scale.reshape(-1), sb), "scales_grid": self.scale_grid,
                    "qzeros": pack(self.zero.reshape(-1), sb), "zeros_grid": self.zero_grid}
        return out | {"outlier_row_ptr": self.row_ptr, "outlier_cols": self.col_idx, "outlier_values": self.values}

    @classmethod
    def from_packed(cls, fmt: SpQRFormat, shape: tuple[int, int], tensors: dict[str, torch.Tensor]) -> SpQRWeight:
        rows, cols = shape
        codes = unpack(tensors["qweight"], fmt.bits, cols)
        outliers = (tensors["outlier_row_ptr"], tensors["outlier_cols"], tensors["outlier_values"])
        if not fmt.quantized_stats:
            return cls(fmt, codes, tensors["scales"], tensors["zeros"], None, None, *outliers)
        n = rows * (cols // fmt.beta1)
        scale = unpack(tensors["qscales"], fmt.stat_bits, n).reshape(rows, -1)
        zero = unpack(tensors["qzeros"], fmt.stat_bits, n).reshape(rows, -1)
        return cls(fmt, codes, scale, zero, tensors["scales_grid"], tensors["zeros_grid"], *outliers)

    def stored_bits(self) -> int:
        return sum(t.numel() * t.element_size() * 8 for t in self.packed().values())

    def bits_per_weight(self) -> float:
        return self.stored_bits() / self.codes.numel()


def spqr_packed_shapes(fmt: SpQRFormat, shape: tuple[int, int],
                       outliers: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of `SpQRWeight.packed()` for a layer with `outliers` stored outliers."""
    rows, cols = shape
    groups = cols // fmt.beta1
    out = {"qweight": ((rows, packed_length(cols, fmt.bits)), torch.int32)}
    if fmt.quantized_stats:
        grid = ((rows // fmt.beta2, groups, 2), SCALE_DTYPE)
        words = ((packed_length(rows * groups, fmt.stat_bits),), torch.int32)
        out |= {"qscales": words, "scales_grid": grid, "qzeros": words, "zeros_grid": grid}
    else:
        out |= {"scales": ((rows, groups), SCALE_DTYPE), "zeros": ((rows, groups), SCALE_DTYPE)}
    return out | {"outlier_row_ptr": ((rows + 1,), torch.int32), "outlier_cols": ((outliers,), torch.int16),
                  "outlier_values": ((outliers,), SCALE_DTYPE)}


def to_csr(mask: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row pointers (int32), 16-bit column indices and float16 values of the True entries of mask [out, in]."""
    r, c = mask.nonzero(as_tuple=True)  # row-major order
    counts = torch.bincount(r, minlength=mask.shape[0])
    row_ptr = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    row_ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    col = torch.where(c >= 2**15, c - 2**16, c).to(torch.int16)
    return row_ptr, col, values[r, c].to(SCALE_DTYPE)
