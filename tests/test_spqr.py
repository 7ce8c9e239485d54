"""SpQR: reduction to GPTQ, stored tensors, bit accounting, outliers, and the pipeline round trip."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lowbit
from lowbit import api
from lowbit.data.calibration import CalibConfig
from lowbit.errors import LowbitError
from lowbit.formats import IntFormat, PerGroup, SpQRFormat, SpQRWeight, from_packed, packed_shapes
from lowbit.methods.gptq import GPTQConfig, accumulate, gptq_quantize, init_stats
from lowbit.methods.spqr import SpQRConfig, leave_one_out_gain, spqr_quantize
from lowbit.recipe import Recipe
from lowbit.runtime.qlinear import QuantLinear


def _layer(seed: int, rows: int = 64, cols: int = 256, tokens: int = 1024, heavy: bool = True):
    """A layer with correlated inputs and, optionally, heavy-tailed weights (a few large ones, as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = torch.randn(tokens, cols, generator=g) @ mix * (torch.rand(cols, generator=g) * 2 + 0.1)
    W = torch.randn(rows, cols, generator=g) * 0.05
    if heavy:
        W = W * torch.where(torch.rand(rows, cols, generator=g) < 0.01, 8.0, 1.0)
    return W, accumulate(init_stats(cols), X), X


def _err(W, Q, X):
    return ((W - Q) @ X.T).norm().item()


@pytest.mark.parametrize("bits,beta1", [(4, 16), (3, 8), (2, 32)])
def test_infinite_tau_and_16_bit_statistics_is_gptq_with_groups_of_beta1(bits, beta1):
    W, stats, _ = _layer(0)
    sp = spqr_quantize(W, stats, SpQRFormat(bits, beta1, 16, stat_bits=16), SpQRConfig(outlier_threshold=math.inf))
    column_order = GPTQConfig(act_order=False)
    gp = gptq_quantize(W, stats, IntFormat(bits, symmetric=False, granularity=PerGroup(beta1)), column_order)
    assert sp.outliers == 0
    assert torch.equal(sp.codes, gp.codes)
    assert torch.equal(sp.scale, gp.scale) and torch.equal(sp.zero.float(), gp.zero.float())
    assert torch.equal(sp.dequantize(), gp.dequantize())


@pytest.mark.parametrize("stat_bits", [3, 16])
def test_stored_tensors_round_trip(stat_bits):
    W, stats, _ = _layer(1)
    fmt = SpQRFormat(3, 16, 16, stat_bits)
    sp = spqr_quantize(W, stats, fmt, SpQRConfig(outlier_rate=0.01))
    assert sp.outliers > 0
    packed = sp.packed()
    shapes = packed_shapes(fmt, sp.shape, sp.outliers)
    assert {k: (tuple(v.shape), v.dtype) for k, v in packed.items()} == shapes
    back = from_packed(fmt, sp.shape, packed)
    assert isinstance(back, SpQRWeight)
    assert torch.equal(back.dequantize(), sp.dequantize())
    # the runtime module stores the same tensors and applies the reconstructed weight
    layer = QuantLinear.from_quantized(sp, lowbit.recipe.LayerSpec(fmt))
    x = torch.randn(5, W.shape[1])
    torch.testing.assert_close(layer(x), x @ sp.dequantize().T, rtol=0, atol=0)
    assert layer.stored_bits() == sp.stored_bits()


def test_bit_accounting_matches_the_paper_formula():
    W, stats, _ = _layer(2)  # 64 × 256: no padding in any packed tensor
    rows, cols = W.shape
    for fmt in (SpQRFormat(4, 16, 16, 3), SpQRFormat(3, 16, 16, 3), SpQRFormat(3, 16, 16, 16)):
        sp = spqr_quantize(W, stats, fmt, SpQRConfig(outlier_threshold=0.2))
        row_pointers = 32 * (rows + 1)
        assert sp.stored_bits() == round(fmt.estimated_bits(sp.outlier_rate) * rows * cols) + row_pointers
    # the paper's own numbers: 4-bit weights, 3-bit statistics, β1 = β2 = 16 → 4.625 bits + 32 per outlier
    assert SpQRFormat(4, 16, 16, 3).estimated_bits(0.0) == 4 + 6 / 16 + 64 / 256
    assert SpQRFormat(4, 16, 16, 3).estimated_bits(0.01) == pytest.approx(4.625 + 0.32)


def test_outliers_are_exact_16_bit_values_and_reduce_the_layer_error():
    W, stats, X = _layer(3)
    fmt = SpQRFormat(3, 16, 16, 3)
    none = spqr_quantize(W, stats, fmt, SpQRConfig(outlier_threshold=math.inf))
    some = spqr_quantize(W, stats, fmt, SpQRConfig(outlier_rate=0.02))
    assert none.outliers == 0 and some.outliers > 0
    mask, values = some.dense_outliers()
    deq = some.dequantize()
    assert torch.equal(deq[mask], values[mask]) and torch.equal(values[mask], values[mask].half().float())
    assert _err(W, deq, X) < 0.8 * _err(W, none.dequantize(), X)


def test_target_outlier_rate_is_reached():
    W, stats, _ = _layer(4)
    for rate in (0.005, 0.02):
        sp = spqr_quantize(W, stats, SpQRFormat(3, 16, 16, 3), SpQRConfig(outlier_rate=rate))
        assert abs(sp.outlier_rate - rate) <= 0.1 * rate + 1 / W.numel()


def test_quantized_statistics_cost_little_and_beat_rtn():
    W, stats, X = _layer(5, heavy=False)
    exact = spqr_quantize(W, stats, SpQRFormat(3, 16, 16, 16), SpQRConfig(outlier_threshold=math.inf)).dequantize()
    coded = spqr_quantize(W, stats, SpQRFormat(3, 16, 16, 3), SpQRConfig(outlier_threshold=math.inf)).dequantize()
    rtn = lowbit.formats.quantize(W, IntFormat(3, False, PerGroup(16))).dequantize()
    assert _err(W, coded, X) < 1.15 * _err(W, exact, X)
    assert _err(W, coded, X) < 0.9 * _err(W, rtn, X)


def test_leave_one_out_gain_is_largest_for_the_extreme_weight():
    w = torch.tensor([[0.01, -0.02, 0.015, 0.5, 0.0, -0.01, 0.02, 0.005]])
    gain = leave_one_out_gain(w, torch.ones(8), SpQRFormat(3, 8, 1, 16))
    assert gain.argmax().item() == 3 and gain[0, 3] > 0


def test_bad_settings_are_refused():
    W, stats, _ = _layer(6)
    with pytest.raises(LowbitError, match="does not divide the input dimension"):
        spqr_quantize(W, stats, SpQRFormat(4, 24, 16, 3))
    with pytest.raises(LowbitError, match="output dimension"):
        spqr_quantize(W[:40], stats, SpQRFormat(4, 16, 16, 3))
    with pytest.raises(LowbitError, match="statistics have 2 to 8 bits"):
        SpQRFormat(4, 16, 16, 12)
    with pytest.raises(LowbitError, match="target outlier rate"):
        SpQRConfig(outlier_rate=0.7)
    with pytest.raises(LowbitError, match="no per-channel form"):
        Recipe(method="spqr", group_size=0)
    with pytest.raises(LowbitError, match="weights only"):
        Recipe(method="spqr", scheme="w8a8")
    with pytest.raises(LowbitError, match="unknown preset"):
        Recipe.preset("spqr-2bit")
    assert Recipe.preset("spqr-near-lossless").default_spec.weight == SpQRFormat(4, 16, 16, 3)
    assert Recipe(method="spqr", scheme="w3a16").default_spec.weight == SpQRFormat(3, 16, 16, 3)


def test_pipeline_and_checkpoint_round_trip(_stories, stories_tokenizer, tmp_path):
    """stories260K (dims 64 and 172): β1 = β2 = 4; the loaded checkpoint reproduces the quantized model."""
    calib = CalibConfig(dataset="c4", samples=8, seqlen=128)
    recipe = Recipe(method="spqr", scheme="w3a16", group_size=4, options={"stat_group": 4, "outlier_rate": 0.01})
    result = api.quantize(copy.deepcopy(_stories), recipe, tokenizer=stories_tokenizer, calib=calib, device="cpu",
                          progress=False)
    layers = [m for m in result.model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.outliers > 0 for m in layers)
    api.save(result, tmp_path / "s")
    ids = stories_tokenizer("Once upon a time there was a cat", return_tensors="pt").input_ids
    loaded = lowbit.load(tmp_path / "s")
    assert torch.equal(loaded(ids).logits, result.model(ids).logits)
    rate = sum(m.outliers for m in layers) / sum(m.in_features * m.out_features for m in layers)
    assert 0.008 < rate < 0.012
