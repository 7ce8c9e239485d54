"""The kernels' layout of packed codes: the checkpoint's words, re-ordered once so each bit field is a contiguous
run of columns.

A checkpoint word holds P = 32/b codes of consecutive columns (lowbit.formats.packing). The kernels cut K into
tiles of BK = BW·P columns, BW words per row; in the kernel layout, word w of a tile holds at bits [j·b, j·b + b)
the code of column j·BW + w of that tile. Shifting every word of a tile by j·b then gives the codes of the BW
consecutive columns j·BW … j·BW + BW − 1: one slice of the tile, which meets a contiguous slice of x (or is one
K-step of a tensor-core product) with no data movement between threads.

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


def interleave(qweight: torch.Tensor, bits: int, k: int, bw: int) -> torch.Tensor:
    """Checkpoint words [N, ⌈K/32⌉·b] → kernel words [N, kernel_words(K)]."""
    per = 32 // bits
    n = qweight.shape[0]
    words = kernel_words(k, bits, bw)
    codes = torch.zeros(n, words * per, dtype=torch.uint8, device=qweight.device)
    codes[:, :k] = unpack(qweight, bits, k)
    # tile t, slice j, word w → the code that word w of tile t holds at field j
    codes = codes.reshape(n, -1, per, bw).transpose(2, 3)
    return pack(codes.reshape(n, -1), bits)


def deinterleave(kweight: torch.Tensor, bits: int, k: int, bw: int) -> torch.Tensor:
    """Inverse of `interleave`: kernel words → checkpoint words."""
    per = 32 // bits
    n = kweight.shape[0]
    codes = unpack(kweight, bits, kweight.shape[1] * per).reshape(n, -1, bw, per).transpose(2, 3)
    return pack(codes.reshape(n, -1)[:, :k], bits)
