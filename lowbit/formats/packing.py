"""Bit packing of b-bit codes (2 ≤ b ≤ 8) into 32-bit words, along the last dimension.

Every 32 consecutive codes become b words: code j of a chunk occupies bits [j·b, j·b + b) of the chunk's
32·b-bit little-endian stream, so 3-, 5-, 6- and 7-bit codes may straddle two words. The last dimension is
padded with zeros to a multiple of 32; `unpack` needs the original length to drop the padding.
Words are stored as int32 (safetensors and torch have no general uint32 arithmetic); the bits are what count.
"""

from __future__ import annotations

import torch

CHUNK = 32


def packed_length(n: int, bits: int) -> int:
    """Number of int32 words that hold n codes of `bits` bits."""
    return -(-n // CHUNK) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes [..., n] (values < 2^bits) into int32 words [..., packed_length(n, bits)]."""
    _check_bits(bits)
    n = codes.shape[-1]
    pad = -n % CHUNK
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).reshape(*codes.shape[:-1], -1, CHUNK)
    words = torch.zeros(*c.shape[:-1], bits, dtype=torch.int64, device=codes.device)
    for j in range(CHUNK):
        start = j * bits
        w, shift = divmod(start, 32)
        words[..., w] |= (c[..., j] << shift) & 0xFFFFFFFF
        if shift + bits > 32:
            words[..., w + 1] |= c[..., j] >> (32 - shift)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.reshape(*codes.shape[:-1], -1).to(torch.int32)


def unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 codes [..., n]."""
    _check_bits(bits)
    w64 = words.to(torch.int64).reshape(*words.shape[:-1], -1, bits) & 0xFFFFFFFF
    mask = 2**bits - 1
    cols = []
    for j in range(CHUNK):
        start = j * bits
        w, shift = divmod(start, 32)
        v = w64[..., w] >> shift
        if shift + bits > 32:
            v = v | (w64[..., w + 1] << (32 - shift))
        cols.append(v & mask)
    codes = torch.stack(cols, dim=-1).reshape(*words.shape[:-1], -1)
    return codes[..., :n].to(torch.uint8)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"packing supports 1..8 bits per code, got {bits}")
