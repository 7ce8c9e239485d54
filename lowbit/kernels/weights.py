"""A layer's weight as the weight-only kernels read it, built once from the checkpoint's (lowbit.formats) and
turned back into it for saving.

- Codes go into the kernel layout (lowbit.kernels.layout) in fields of 2, 4 or 8 bits: a 3-bit code takes a 4-bit
  field and a 5- to 7-bit code an 8-bit one (`field_bits`); the value of a code does not change, so neither does ŵ.
- A column → group map (g_idx, GPTQ act-order without static groups) becomes a column order: the columns are
  sorted by group once, so groups are runs of G consecutive columns again, and x is gathered in that order at
  each call (K values).
- The statistics of each (row, group) are one 32-bit word, two float16 halves: the scale s (low) and the zero z
  (integer zeros are exact in float16), or the minimum m with float minimums (high), so the kernel reads a group
  with one load (`ZeroMode`).
- SpQR (arXiv 2306.03078): the dense b_w-bit part as above, in the rows layout (lowbit.kernels.gemv_rows). Its
  bilevel statistics (§4.2), s = c_s·a_s + m_s and z = c_z·a_z + m_z, are decoded once here and rounded to float16
  (relative error ≤ 2^-11 in s, ≤ 2^-9 of a step in z, far below the float16/bfloat16 rounding of the output).
  The outliers stay CSR by row, each with the correction w_o − ŵ_dense(r, c) in float32 that turns the dense
  product at that position into the stored value.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import IntEnum

import torch

from lowbit.formats.granularity import PerChannel, PerGroup
from lowbit.formats.intgrid import IntFormat
from lowbit.formats.packing import pack, unpack
from lowbit.formats.spqr import SpQRFormat, SpQRWeight
from lowbit.formats.weight import QuantizedWeight
from lowbit.kernels.layout import deinterleave, interleave, slice_words


class ZeroMode(IntEnum):
    """How the kernel forms ŵ for a code c of one (row, group) from its statistics word (s, z/m)."""

    SYMMETRIC = 0  # (c − z)·s with z = 2^(b−1) for every group (the high half is unused)
    ZERO = 1  # (c − z)·s, z per group (integer zero points, SpQR's float zeros)
    MINIMUM = 2  # c·s + m, m per group


def field_bits(bits: int) -> int:
    """The field width (2, 4 or 8) that holds a code of `bits` bits."""
    return 2 if bits <= 2 else (4 if bits <= 4 else 8)


@dataclass
class Outliers:
    """SpQR's sparse part: CSR row pointers (int32 [N + 1]), columns (int16, read as unsigned), the stored values
    (float16) and the corrections w_o − ŵ_dense (float32) that the product adds."""

    row_ptr: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    corrections: torch.Tensor


@dataclass
class KernelWeight:
    """Codes in the kernel layout [N, KW] (int32), one statistics word per (row, group) [N, NG] (int32: float16 s
    in the low half, z or m in the high half), and what a format adds: a column order for g_idx, SpQR's
    outliers."""

    words: torch.Tensor
    bits: int  # the format's bits per code
    group: int  # columns per group, 0: one group per row
    mode: ZeroMode
    stats: torch.Tensor
    in_features: int
    out_features: int
    perm: torch.Tensor | None = None  # int64 [K]: kernel column i is input column perm[i]
    outliers: Outliers | None = None
    # "tiles": words [N, KW] interleaved per tile (lowbit.kernels.layout), statistics [N, NG]; "rows": words
    # [KW, N] in the checkpoint's column order and statistics [NG, N] (lowbit.kernels.gemv_rows)
    layout: str = "tiles"

    @property
    def field(self) -> int:
        return field_bits(self.bits)

    @property
    def slice_words(self) -> int:
        return slice_words(self.field, self.group)

    def in_rows_layout(self) -> KernelWeight:
        """The same weight in the rows layout."""
        if self.layout == "rows":
            return self
        return replace(self, words=pack(self.kernel_codes(), self.field).T.contiguous(),
                       stats=self.stats.T.contiguous(), layout="rows")

    @property
    def symmetric_zero(self) -> int:
        return 1 << (self.bits - 1)

    def kernel_codes(self) -> torch.Tensor:
        """The codes [N, K] (uint8) in the kernel's column order."""
        if self.layout == "rows":
            return unpack(self.words.T, self.field, self.in_features)
        return deinterleave(self.words, self.field, self.in_features, self.slice_words)

    def codes(self) -> torch.Tensor:
        """The codes [N, K] (uint8) in the input's column order: what the checkpoint packs."""
        codes = self.kernel_codes()
        return codes if self.perm is None else codes[:, torch.argsort(self.perm)]


def stats_words(scale: torch.Tensor, second: torch.Tensor | None) -> torch.Tensor:
    """[N, NG] int32 words: float16 scale in the low half, `second` (zero or minimum) as float16 in the high."""
    lo = scale.to(torch.float16).contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    if second is None:
        return lo
    hi = second.to(torch.float16).contiguous().view(torch.int16).to(torch.int32)
    return lo | (hi << 16)


def unsupported(fmt) -> str | None:
    """Why a weight format has no weight-only kernel, or None when it has one."""
    if isinstance(fmt, SpQRFormat):
        return _group_problem(fmt.beta1)
    if fmt.kind == "ggml":
        return f"llama.cpp {fmt.type.upper()} weights"
    if not isinstance(fmt, IntFormat):
        return f"{fmt.kind} weights"
    g = fmt.granularity
    if isinstance(g, PerGroup):
        return _group_problem(g.size)
    if not isinstance(g, PerChannel):
        return "one scale for the whole tensor"
    return None


def _group_problem(size: int) -> str | None:
    if size < 16 or size & (size - 1):
        return f"groups of {size} (kernels for powers of two from 16)"
    return None


def group_size(fmt: IntFormat | SpQRFormat) -> int:
    """Columns per group, 0 for one group per row."""
    return fmt.granularity.size if isinstance(fmt.granularity, PerGroup) else 0


def kernel_weight(qw: QuantizedWeight | SpQRWeight) -> KernelWeight:
    """The kernels' form of a quantized weight (on the weight's device). Raises ValueError for a g_idx whose
    groups are not runs of G columns once sorted (no kernel; the caller keeps the reference)."""
    if isinstance(qw, SpQRWeight):
        return _spqr(qw)
    fmt: IntFormat = qw.fmt
    n, k = qw.shape
    group = group_size(fmt)
    codes, perm = qw.codes, None
    if qw.g_idx is not None:
        perm = torch.argsort(qw.g_idx.long(), stable=True)
        if not torch.equal(qw.g_idx.long()[perm], torch.arange(k, device=perm.device) // group):
            raise ValueError(f"a g_idx whose groups are not {group} columns each")
        codes = codes[:, perm]
    mode = ZeroMode.MINIMUM if fmt.float_zero else (ZeroMode.ZERO if qw.zero is not None else ZeroMode.SYMMETRIC)
    words = interleave(codes, field_bits(fmt.bits), slice_words(field_bits(fmt.bits), group))
    return KernelWeight(words, fmt.bits, group, mode, stats_words(qw.scale, qw.zero), k, n, perm=perm)


def _spqr(sw: SpQRWeight) -> KernelWeight:
    """SpQR in the rows layout: at one row of x its GEMV beat the tile layout's by 1.3–1.5× on an H200
    (BENCHMARKS.md), the groups of 16 being two words of one thread there."""
    fmt = sw.fmt
    n, k = sw.shape
    field = field_bits(fmt.bits)
    s, z = sw.statistics()
    kw = KernelWeight(pack(sw.codes, field).T.contiguous(), fmt.bits, fmt.beta1, ZeroMode.ZERO,
                      stats_words(s, z).T.contiguous(), k, n, layout="rows")
    if sw.outliers:
        rows = torch.repeat_interleave(torch.arange(n, device=sw.codes.device),
                                       (sw.row_ptr[1:] - sw.row_ptr[:-1]).long())
        cols = sw.col_idx.long() & 0xFFFF
        g = cols // fmt.beta1
        s16, z16 = s.half().float(), z.half().float()  # what the kernel multiplies with
        dense = (sw.codes[rows, cols].float() - z16[rows, g]) * s16[rows, g]
        kw.outliers = Outliers(sw.row_ptr.contiguous(), sw.col_idx.contiguous(), sw.values.contiguous(),
                               (sw.values.float() - dense).contiguous())
    return kw
