"""Number formats: error bounds (property tests), agreement with a direct reference, clipping, fp8, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.formats import FP8Format, IntFormat, PerChannel, PerGroup, PerTensor, fake_quantize, quantize
from lowbit.formats.grouping import grouped

granularities = st.sampled_from(["tensor", "channel", "group"])


def _weights(seed: int, out_f: int, in_f: int, magnitude: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * magnitude
    # heavy-tailed outliers, as in real LLM weights
    w[torch.rand(out_f, in_f, generator=g) < 0.01] *= 20
    return w


def _granularity(kind: str, group: int):
    return {"tensor": PerTensor(), "channel": PerChannel(), "group": PerGroup(group)}[kind]


@settings(max_examples=120, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(), float_zero=st.booleans(), kind=granularities,
       groups=st.integers(1, 6), group=st.sampled_from([1, 4, 8, 32]), out_f=st.integers(1, 12),
       magnitude=st.sampled_from([1e-4, 0.02, 1.0, 300.0]), seed=st.integers(0, 2**16), full=st.booleans())
def test_int_error_bounded_by_half_step(bits, symmetric, float_zero, kind, groups, group, out_f, magnitude, seed,
                                        full):
    zero_point = "float" if float_zero and not symmetric else "int"
    fmt = IntFormat(bits, symmetric, _granularity(kind, group), zero_point=zero_point, full_range=full and symmetric)
    w = _weights(seed, out_f, groups * group, magnitude)
    q = quantize(w, fmt)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
    err = grouped((q.dequantize() - w).abs(), fmt.granularity)
    half_step = q.scale.float().unsqueeze(-1) / 2
    # ŵ = c·s + m is computed in float32: one rounding at |w|'s magnitude on top of the grid's half step
    f32_rounding = torch.finfo(torch.float32).eps * grouped(w.abs(), fmt.granularity)
    assert (err <= half_step * (1 + 1e-5) + f32_rounding + 1e-12).all(), (err - half_step).max()


def _reference_int(w: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    """A direct per-row implementation of the documented equations, in float64 with float16 scales (rounded up)."""
    out = np.empty_like(w)
    for r, row in enumerate(w):
        lo, hi = min(row.min(), 0.0), max(row.max(), 0.0)
        s = max(abs(lo), abs(hi)) / (2 ** (bits - 1) - 1) if symmetric else (hi - lo) / (2**bits - 1)
        s16 = np.float16(s)
        if float(s16) < s:
            s16 = np.nextafter(s16, np.float16(np.inf))
        s = float(s16)
        z = 2 ** (bits - 1) if symmetric else np.clip(np.round(-lo / s), 0, 2**bits - 1)
        c = np.clip(np.round(row / s) + z, 0, 2**bits - 1)
        out[r] = (c - z) * s
    return out


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_matches_direct_reference(bits, symmetric):
    w = _weights(bits, 16, 48, 0.05)
    ours = fake_quantize(w, IntFormat(bits, symmetric, PerChannel())).double().numpy()
    ref = _reference_int(w.double().numpy(), bits, symmetric)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-7)


def test_group_granularity_equals_per_channel_on_each_group():
    w = _weights(1, 8, 64, 0.1)
    grouped_q = fake_quantize(w, IntFormat(4, False, PerGroup(16)))
    for j in range(4):
        cols = slice(16 * j, 16 * (j + 1))
        torch.testing.assert_close(grouped_q[:, cols], fake_quantize(w[:, cols], IntFormat(4, False, PerChannel())),
                                   rtol=0, atol=0)


def test_per_tensor_uses_one_scale():
    q = quantize(_weights(2, 8, 16, 1.0), IntFormat(8, True, PerTensor()))
    assert q.scale.shape == (1, 1)


def test_float_zero_reproduces_a_q4_1_grid_exactly():
    g = torch.Generator().manual_seed(0)
    d = (torch.rand(16, 4, 1, generator=g) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(16, 4, 1, generator=g) * 0.05).half().float()
    codes = torch.randint(0, 16, (16, 4, 32), generator=g).float()
    codes[..., 0], codes[..., 1] = 0, 15  # each block uses its whole range, as Q4_1 blocks of real weights do
    w = (codes * d + m).reshape(16, 128)
    fmt = IntFormat(4, False, PerGroup(32), zero_point="float")
    assert torch.equal(fake_quantize(w, fmt), w)
    assert not torch.equal(fake_quantize(w, IntFormat(4, False, PerGroup(32))), w)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(), seed=st.integers(0, 2**16))
def test_clipping_search_never_worse_than_absmax(bits, symmetric, seed):
    w = _weights(seed, 6, 64, 0.1)
    plain = (fake_quantize(w, IntFormat(bits, symmetric, PerGroup(32))) - w).pow(2)
    clipped = (fake_quantize(w, IntFormat(bits, symmetric, PerGroup(32), clip=True)) - w).pow(2)
    per_group = lambda e: e.reshape(6, 2, 32).sum(-1)  # noqa: E731
    assert (per_group(clipped) <= per_group(plain) * (1 + 1e-6)).all()


def test_clipping_search_helps_on_outliers():
    w = _weights(3, 64, 128, 0.1)
    plain = (fake_quantize(w, IntFormat(3, True, PerChannel())) - w).pow(2).sum()
    clipped = (fake_quantize(w, IntFormat(3, True, PerChannel(), clip=True)) - w).pow(2).sum()
    assert clipped < 0.9 * plain


@settings(max_examples=60, deadline=None)
@given(per_tensor=st.booleans(), magnitude=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**16))
def test_fp8_error_within_half_ulp(per_tensor, magnitude, seed):
    w = _weights(seed, 8, 32, magnitude)
    fmt = FP8Format(PerTensor() if per_tensor else PerChannel())
    q = quantize(w, fmt)
    assert q.codes.dtype == torch.float8_e4m3fn
    scale = q.scale.reshape(-1, 1) if not per_tensor else q.scale.reshape(1, 1)
    bound = w.abs() * 2**-4 + scale * 2**-10  # half an ulp: 3 mantissa bits; subnormal step 2^-9
    assert ((q.dequantize() - w).abs() <= bound * (1 + 1e-6)).all()
    # agreement with torch's own cast
    direct = (w / scale).to(torch.float8_e4m3fn).float() * scale
    torch.testing.assert_close(q.dequantize(), direct, rtol=0, atol=0)


def test_fp8_refuses_groups():
    with pytest.raises(LowbitError, match="per-tensor or per-channel"):
        FP8Format(PerGroup(32))


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_bits_outside_range_refused(bits):
    with pytest.raises(LowbitError, match="2 to 8 bits"):
        IntFormat(bits)


def test_group_size_must_divide_and_error_names_working_sizes():
    with pytest.raises(LowbitError, match=r"does not divide the input dimension 576.*64.*192"):
        quantize(torch.randn(4, 576), IntFormat(4, True, PerGroup(128)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_refused(bad):
    w = torch.randn(4, 8)
    w[1, 2] = bad
    with pytest.raises(LowbitError, match="NaN or Inf"):
        quantize(w, IntFormat(4))


def test_zero_and_tiny_groups_do_not_divide_by_zero():
    w = torch.zeros(2, 32)
    w[1] = 1e-9
    for fmt in (IntFormat(4), IntFormat(4, False), IntFormat(4, False, zero_point="float"), FP8Format()):
        out = fake_quantize(w, fmt)
        assert torch.isfinite(out).all() and (out - w).abs().max() < 1e-7


def test_exact_div_is_correctly_rounded():
    from lowbit.formats.intgrid import exact_div

    x = torch.rand(10000) * 10
    assert torch.equal(exact_div(x, 7), (x.double() / 7).float())
    assert torch.equal(exact_div(x, 448.0), (x.double() / 448).float())


def test_full_range_uses_every_code_and_a_finer_step():
    """Symmetric full range (GPTQ's reference convention): s = max|w| / (2^(b-1) - 1/2), a step 2^b/(2^b - 2)
    finer than the restricted grid's; ±max|w| sit half a step beyond the outer codes, so |w - ŵ| <= s/2 still."""
    w = torch.linspace(-1, 1, 64).reshape(1, 64)
    full = quantize(w, IntFormat(4, True, PerChannel(), full_range=True))
    restricted = quantize(w, IntFormat(4, True, PerChannel()))
    assert full.codes.max() == 15 and restricted.codes.max() == 15
    assert float(restricted.scale) / float(full.scale) == pytest.approx(7.5 / 7, rel=1e-3)
    assert ((full.dequantize() - w).abs() <= float(full.scale) / 2 * (1 + 1e-5)).all()
    with pytest.raises(LowbitError, match="symmetric"):
        IntFormat(4, False, PerChannel(), full_range=True)
