"""The kernels' layout of packed codes: the checkpoint's codes, re-ordered once so each bit field is a contiguous
run of columns.

Codes of b = 2, 4 or 8 bits fill P = 32/b fields of a 32-bit word (3-bit codes travel in 4-bit fields, 5- to 7-bit
ones in 8-bit fields: lowbit.kernels.weights). The kernels cut K into tiles of BK = BW·P columns, BW words per row;
in the kernel layout, word w of a tile holds at bits [j·b, j·b + b) the code of column j·BW + w of that tile.
Shifting every word of a tile by j·b then gives the codes of the BW consecutive columns j·BW … j·BW + BW − 1: one
slice of the tile, which meets a contiguous slice of x (or is one K-step of a tensor-core product) with no data
movement between threads.

K is padded with zero codes to a multiple of BK; the kernels never read x beyond K, so padding adds nothing.
BW is chosen so that a slice never straddles two groups and a tile holds whole groups (`slice_words`).
"""

from __future__ import annotations

import torch

from lowbit.formats.packing import pack, unpack


def slice_words(bits: int, group: int) -> int:
    """BW for codes of `bits` bits in groups of `group` columns (0: one group per row): 32 words, fewer when a
    group is narrower than 32 columns, more when a group is wider than a tile of 32 words."""
    per = 32 // bits
    if group == 0:
        return 32
    return max(min(32, group), group // per)


def kernel_words(k: int, bits: int, bw: int) -> int:
    """Words per row in the kernel layout: K rounded up to whole tiles."""
    bk = bw * (32 // bits)
    return -(-k // bk) * bw


def interleave(codes: torch.Tensor, bits: int, bw: int) -> torch.Tensor:
    """Codes [N, K] (uint8, each < 2^bits) → kernel words [N, kernel_words(K)]."""
    per = 32 // bits
    n, k = codes.shape
    words = kernel_words(k, bits, bw)
    padded = torch.zeros(n, words * per, dtype=torch.uint8, device=codes.device)
    padded[:, :k] = codes
    # tile t, slice j, word w → the code that word w of tile t holds at field j
    padded = padded.reshape(n, -1, per, bw).transpose(2, 3)
    return pack(padded.reshape(n, -1), bits)


def deinterleave(kweight: torch.Tensor, bits: int, k: int, bw: int) -> torch.Tensor:
    """Inverse of `interleave`: kernel words → codes [N, K] (uint8)."""
    per = 32 // bits
    n = kweight.shape[0]
    codes = unpack(kweight, bits, kweight.shape[1] * per).reshape(n, -1, bw, per).transpose(2, 3)
    return codes.reshape(n, -1)[:, :k].contiguous()
