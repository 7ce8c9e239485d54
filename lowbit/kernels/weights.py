"""A layer's weight as the weight-only kernels read it, built once from the checkpoint's (lowbit.formats) and
turned back into it for saving.

- Codes go into the kernel layout (lowbit.kernels.layout) in fields of 2, 4 or 8 bits: a 3-bit code takes a 4-bit
  field and a 5- to 7-bit code an 8-bit one (`field_bits`); the value of a code does not change, so neither does ŵ.
- A column → group map (g_idx, GPTQ act-order without static groups) becomes a column order: the columns are
  sorted by group once, so groups are runs of G consecutive columns again, and x is gathered in that order at
  each call (K values).
- Zero points, statistics and grids are kept per (row, group) in the form the kernel loads directly (`ZeroMode`).
- SpQR (arXiv 2306.03078): the dense b_w-bit part as above with its bilevel statistics decoded in the kernel,
  s = c_s·a_s + m_s and z = c_z·a_z + m_z (§4.2); the outliers stay CSR by row, each with the correction
  w_o − ŵ_dense(r, c) in float32 that turns the dense product at that position into the stored value.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

from lowbit.formats.granularity import PerChannel, PerGroup
from lowbit.formats.intgrid import IntFormat
from lowbit.formats.spqr import SpQRFormat, SpQRWeight
from lowbit.formats.weight import QuantizedWeight
from lowbit.kernels.layout import deinterleave, interleave, slice_words


class ZeroMode(IntEnum):
    """How the kernel forms ŵ for a code c of one (row, group)."""

    SYMMETRIC = 0  # (c − z)·s, z = 2^(b−1) for every group
    INT_ZERO = 1  # (c − z)·s, z a uint8 per group
    FLOAT_ZERO = 2  # (c − z)·s, z a float16 per group (SpQR with 16-bit statistics)
    BILEVEL = 3  # (c − z)·s, s and z decoded from uint8 codes and float16 (step, min) per β2 rows (SpQR)
    FLOAT_MIN = 4  # c·s + m, m a float16 per group


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
    """Codes in the kernel layout [N, KW] (int32), per-(row, group) statistics as `mode` reads them, and what a
    format adds: SpQR's second-level grids and outliers, a column order for g_idx."""

    words: torch.Tensor
    bits: int  # the format's bits per code
    group: int  # columns per group, 0: one group per row
    mode: ZeroMode
    scales: torch.Tensor  # [N, NG]: float16, or uint8 codes with BILEVEL
    zeros: torch.Tensor | None  # [N, NG]: uint8, float16 (zeros or minimums), or uint8 codes with BILEVEL
    in_features: int
    out_features: int
    grids: tuple[torch.Tensor, torch.Tensor] | None = None  # BILEVEL: (step, min) [N/β2, NG, 2] of s and of z
    beta2: int = 1
    perm: torch.Tensor | None = None  # int64 [K]: kernel column i is input column perm[i]
    outliers: Outliers | None = None

    @property
    def field(self) -> int:
        return field_bits(self.bits)

    @property
    def slice_words(self) -> int:
        return slice_words(self.field, self.group)

    @property
    def symmetric_zero(self) -> int:
        return 1 << (self.bits - 1)

    def codes(self) -> torch.Tensor:
        """The codes [N, K] (uint8) in the input's column order: what the checkpoint packs."""
        codes = deinterleave(self.words, self.field, self.in_features, self.slice_words)
        if self.perm is not None:
            codes = codes[:, torch.argsort(self.perm)]
        return codes


def unsupported(fmt) -> str | None:
    """Why a weight format has no weight-only kernel, or None when it has one."""
    if isinstance(fmt, SpQRFormat):
        return _group_problem(fmt.beta1)
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
    if fmt.float_zero:
        mode, zeros = ZeroMode.FLOAT_MIN, qw.zero.to(torch.float16)
    elif qw.zero is not None:
        mode, zeros = ZeroMode.INT_ZERO, qw.zero.to(torch.uint8).contiguous()
    else:
        mode, zeros = ZeroMode.SYMMETRIC, None
    words = interleave(codes, field_bits(fmt.bits), slice_words(field_bits(fmt.bits), group))
    return KernelWeight(words, fmt.bits, group, mode, qw.scale.contiguous(), zeros, k, n, perm=perm)


def _spqr(sw: SpQRWeight) -> KernelWeight:
    fmt = sw.fmt
    n, k = sw.shape
    field = field_bits(fmt.bits)
    words = interleave(sw.codes, field, slice_words(field, fmt.beta1))
    if fmt.quantized_stats:
        mode, grids = ZeroMode.BILEVEL, (sw.scale_grid.contiguous(), sw.zero_grid.contiguous())
        scales, zeros = sw.scale.to(torch.uint8).contiguous(), sw.zero.to(torch.uint8).contiguous()
    else:
        mode, grids, scales, zeros = ZeroMode.FLOAT_ZERO, None, sw.scale.contiguous(), sw.zero.contiguous()
    kw = KernelWeight(words, fmt.bits, fmt.beta1, mode, scales, zeros, k, n, grids, fmt.beta2)
    if sw.outliers:
        rows = torch.repeat_interleave(torch.arange(n, device=sw.codes.device),
                                       (sw.row_ptr[1:] - sw.row_ptr[:-1]).long())
        cols = sw.col_idx.long() & 0xFFFF
        s, z = sw.statistics()
        g = cols // fmt.beta1
        dense = (sw.codes[rows, cols].float() - z[rows, g]) * s[rows, g]
        kw.outliers = Outliers(sw.row_ptr.contiguous(), sw.col_idx.contiguous(), sw.values.contiguous(),
                               (sw.values.float() - dense).contiguous())
    return kw
