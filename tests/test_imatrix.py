"""RTN weighted by importance (llama.cpp's imatrix): the statistics are the mean squared activation per input
column, and each group's range minimizes the weighted error, never doing worse than plain RTN on it."""

from __future__ import annotations

import copy

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import FP8Format, IntFormat, PerChannel, PerGroup, quantize
from lowbit.formats.ggml import LEGACY
from lowbit.methods import imatrix
from lowbit.recipe import LayerSpec


def _stats(x: torch.Tensor) -> imatrix.ImportanceStats:
    return imatrix.accumulate(imatrix.init_stats(x.shape[-1]), x)


def test_importance_is_the_mean_square_per_column_over_all_batches():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 16, generator=g), torch.randn(7, 16, generator=g) * 3
    s = imatrix.accumulate(_stats(a), b)
    both = torch.cat([a.reshape(-1, 16), b])
    assert s.n == 22 and torch.allclose(s.importance, both.pow(2).mean(0))


@pytest.mark.parametrize("fmt", [IntFormat(4, granularity=PerGroup(32)),
                                 IntFormat(3, symmetric=False, granularity=PerGroup(64)),
                                 IntFormat(4, granularity=PerChannel()),
                                 LEGACY["q4_1"].lowbit_format()], ids=["w4g32", "w3g64-asym", "w4-channel", "q4_1"])
def test_weighted_error_never_worse_than_rtn_and_lower_when_importance_is_skewed(fmt):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g) * 0.02
    w[:, ::17] *= 6  # outlier columns that set the groups' ranges
    x = torch.randn(512, 256, generator=g) * torch.linspace(0.1, 3.0, 256)  # columns of very unequal use
    stats = _stats(x)
    ours = imatrix.quantize_layer(w, stats, LayerSpec(fmt))
    plain = quantize(w, fmt)
    clipped = quantize(w, IntFormat(**{**fmt.__dict__, "clip": True}))
    e_ours, e_plain = imatrix.weighted_error(w, ours, stats), imatrix.weighted_error(w, plain, stats)
    assert e_ours <= e_plain and e_ours <= imatrix.weighted_error(w, clipped, stats)  # same candidates, its objective
    assert e_ours < 0.97 * e_plain
    assert ours.fmt == fmt and ours.codes.shape == w.shape


def test_refuses_formats_without_an_integer_grid_and_layers_without_statistics():
    w = torch.randn(8, 64)
    with pytest.raises(LowbitError, match="fp8"):
        imatrix.quantize_layer(w, _stats(torch.randn(4, 64)), LayerSpec(FP8Format()))
    with pytest.raises(LowbitError, match="calibration"):
        imatrix.quantize_layer(w, None, LayerSpec(IntFormat(4, granularity=PerGroup(32))))


def test_imatrix_on_stories_lowers_the_weighted_error(_stories, stories_tokenizer):
    from lowbit import api
    from lowbit.data.calibration import CalibConfig, calibration_ids
    from lowbit.recipe import Recipe
    from lowbit.runtime.qlinear import QuantLinear

    calib = CalibConfig(dataset="c4", samples=4, seqlen=64, seed=2)
    recipe = Recipe(method="imatrix", scheme="w4a16", group_size=16, targets=(r"self_attn",))
    result = api.quantize(copy.deepcopy(_stories), recipe, tokenizer=stories_tokenizer, calib=calib, progress=False)
    layers = {n: m for n, m in result.model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 5 * 4
    # the first block's q/k/v see the calibration tokens' normed embeddings, as in the float model
    seen = []
    hook = _stories.get_submodule("model.layers.0.self_attn.q_proj").register_forward_hook(
        lambda module, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        _stories(calibration_ids(stories_tokenizer, calib))
    hook.remove()
    stats = _stats(seen[0])
    for name in ("q_proj", "k_proj", "v_proj"):
        w = _stories.get_submodule(f"model.layers.0.self_attn.{name}").weight
        ours = layers[f"model.layers.0.self_attn.{name}"].quantized_weight()
        plain = quantize(w.detach().float(), ours.fmt)
        assert imatrix.weighted_error(w, ours, stats) < imatrix.weighted_error(w, plain, stats)
