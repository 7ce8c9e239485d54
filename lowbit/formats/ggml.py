"""llama.cpp's legacy block formats (ggml's Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) as lowbit integer grids, and their bytes.

Each is a group of 32 consecutive input columns with float16 statistics, i.e. one of lowbit's own grids with
groups of 32 (ggml-common.h, block_q*; the dequantization is ggml's, with q the stored integer):

    type   lowbit grid (groups of 32)            ŵ                 block bytes                                bits/w
    Q8_0   8-bit symmetric, q = c − 128         q·d               d, 32 × int8 q                               8.5
    Q4_0   4-bit symmetric, q = c               (q − 8)·d         d, 16 bytes: q_i | q_(i+16) << 4            4.5
    Q4_1   4-bit with float minimum, q = c      q·d + m           d, m, 16 bytes as Q4_0                       5.0
    Q5_0   5-bit symmetric, q = c               (q − 16)·d        d, qh (bit i = bit 4 of q_i), 16 bytes       5.5
    Q5_1   5-bit with float minimum, q = c      q·d + m           d, m, qh, 16 bytes                           6.0

lowbit's symmetric grids put the zero at 2^(b−1), which is ggml's offset. Q4_0 and Q5_0 take llama.cpp's own scale
rule (IntFormat's signed scale: the block's weight of largest magnitude, with its sign, lands exactly on the extra
negative code, d = x_max / −2^(b−1), so d may be negative; GPTQ takes the full range instead: lowbit.recipe);
Q8_0 takes max|w| / 127 (or the full range). `to_blocks` writes a lowbit weight in these bytes exactly;
`from_blocks` reads them back to the same codes and statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.formats.granularity import PerGroup
from lowbit.formats.intgrid import IntFormat
from lowbit.formats.weight import QuantizedWeight

BLOCK = 32


@dataclass(frozen=True)
class BlockType:
    """One legacy ggml type: its name, bits per code, and whether it stores a minimum (else it is symmetric)."""

    name: str
    bits: int
    minimum: bool

    @property
    def block_bytes(self) -> int:
        """d (and m), the 32 high bits of 5-bit codes, and the codes: 32 bytes, or 16 of nibble pairs."""
        return (4 if self.minimum else 2) + (4 if self.bits == 5 else 0) + (BLOCK if self.bits == 8 else BLOCK // 2)

    @property
    def bits_per_weight(self) -> float:
        return self.block_bytes * 8 / BLOCK

    def lowbit_format(self, full_range: bool = False, clip: bool = False) -> IntFormat:
        """The lowbit grid whose codes and statistics this type stores exactly."""
        if self.minimum:
            return IntFormat(self.bits, symmetric=False, granularity=PerGroup(BLOCK), clip=clip, zero_point="float")
        if self.bits < 8:  # llama.cpp's own rule for Q4_0 and Q5_0 (its Q8_0 takes max|w| / 127)
            return IntFormat(self.bits, symmetric=True, granularity=PerGroup(BLOCK), clip=clip, signed_scale=True)
        return IntFormat(self.bits, symmetric=True, granularity=PerGroup(BLOCK), clip=clip, full_range=full_range)


LEGACY = {t.name: t for t in (BlockType("q8_0", 8, False), BlockType("q4_0", 4, False), BlockType("q4_1", 4, True),
                              BlockType("q5_0", 5, False), BlockType("q5_1", 5, True))}


def block_type(fmt) -> BlockType | None:
    """The legacy ggml type that stores this lowbit format exactly, or None."""
    if not isinstance(fmt, IntFormat) or fmt.g_idx or fmt.granularity != PerGroup(BLOCK):
        return None
    minimum = fmt.float_zero
    if not fmt.symmetric and not minimum:
        return None  # integer zero points: ggml's legacy types have none
    for t in LEGACY.values():
        if t.bits == fmt.bits and t.minimum == minimum:
            return t
    return None


def to_blocks(qw: QuantizedWeight) -> np.ndarray:
    """The weight's bytes as ggml stores them: uint8 [rows, (in/32)·block_bytes]."""
    t = block_type(qw.fmt)
    if t is None:
        raise LowbitError(f"{qw.fmt.to_dict()} has no llama.cpp legacy block type: those are groups of 32 with "
                          "symmetric 8-, 4- or 5-bit codes or 4- or 5-bit codes with a float minimum.")
    rows, cols = qw.shape
    if cols % BLOCK:
        raise LowbitError(f"llama.cpp's blocks hold 32 columns; a row of {cols} is not a whole number of blocks.")
    codes = qw.codes.numpy().astype(np.uint8).reshape(rows, cols // BLOCK, BLOCK)
    parts = [_f16_bytes(qw.scale)]
    if t.minimum:
        parts.append(_f16_bytes(qw.zero))
    if t.bits == 8:
        parts.append((codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        if t.bits == 5:
            high = ((codes >> 4) & 1).astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)
            parts.append(np.bitwise_or.reduce(high, axis=-1).astype("<u4")[..., None].view(np.uint8))
        low = codes & 0x0F
        parts.append(low[..., :16] | (low[..., 16:] << 4))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def from_blocks(data: np.ndarray, name: str, shape: tuple[int, int]) -> QuantizedWeight:
    """Inverse of `to_blocks`: the lowbit weight (codes, float16 statistics) held by ggml bytes of type `name`."""
    t = LEGACY[name]
    rows, cols = shape
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows, cols // BLOCK, t.block_bytes)
    d, rest = blocks[..., :2], blocks[..., 2:]
    scale = torch.from_numpy(d.copy().view(np.float16)[..., 0])
    zero = None
    if t.minimum:
        zero = torch.from_numpy(rest[..., :2].copy().view(np.float16)[..., 0])
        rest = rest[..., 2:]
    if t.bits == 8:
        codes = rest.view(np.int8).astype(np.int16) + 128
    else:
        high = 0
        if t.bits == 5:
            qh = rest[..., :4].copy().view("<u4")[..., :1]
            high = ((qh >> np.arange(BLOCK, dtype=np.uint32)) & 1).astype(np.uint8) << 4
            rest = rest[..., 4:]
        codes = np.concatenate([rest & 0x0F, rest >> 4], axis=-1) | high
    fmt = t.lowbit_format()
    return QuantizedWeight(fmt, torch.from_numpy(codes.astype(np.uint8).reshape(rows, cols)), scale, zero)


def _f16_bytes(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float16).contiguous().numpy().view(np.uint8).reshape(*t.shape, 2)
