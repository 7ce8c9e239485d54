"""Bit packing: exact round trips for every width and shape, and the documented bit layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import pack, unpack
from lowbit.formats.packing import packed_length


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(0, 5), n=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_round_trip_exact(bits, rows, n, seed):
    shape = (rows, n) if rows else (n,)
    codes = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int64)
    codes = codes.to(torch.uint8)
    words = pack(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape[-1] == packed_length(n, bits)
    assert torch.equal(unpack(words, bits, n), codes)


def _bitstream_reference(codes: list[int], bits: int) -> list[int]:
    """Pure-Python reference: one big integer, code j at bit offset j*bits of each 32-code chunk."""
    codes = codes + [0] * (-len(codes) % 32)
    words = []
    for c in range(0, len(codes), 32):
        stream = sum(v << (j * bits) for j, v in enumerate(codes[c:c + 32]))
        words += [(stream >> (32 * k)) & 0xFFFFFFFF for k in range(bits)]
    return [w - 2**32 if w >= 2**31 else w for w in words]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_layout_matches_bitstream_reference(bits):
    codes = torch.randint(0, 2**bits, (70,), generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    assert pack(codes, bits).tolist() == _bitstream_reference(codes.tolist(), bits)


def test_known_4bit_word():
    codes = torch.tensor(list(range(8)) + [15] * 24, dtype=torch.uint8)
    words = pack(codes, 4)
    assert words[0].item() == 0x76543210
    assert words[1].item() == -1  # eight 15s: all ones


def test_sizes_are_what_bits_predict():
    assert packed_length(576, 4) == 576 * 4 // 32
    assert packed_length(576, 3) == 576 * 3 // 32
    assert packed_length(172, 3) == 6 * 3  # padded to 192 codes
