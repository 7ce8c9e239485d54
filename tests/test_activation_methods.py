"""AWQ, SmoothQuant, activation quantization at run time, and their checkpoints (stories260K)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit import api
from lowbit.data.calibration import CalibConfig
from lowbit.errors import LowbitError
from lowbit.formats import ActFormat, FP8Format, IntFormat, PerChannel, PerTensor, quantize
from lowbit.formats.activation import fake_quantize_activation
from lowbit.methods import awq, smoothquant
from lowbit.methods.scaling import active_groups, fold
from lowbit.methods.transform import clamp_layer
from lowbit.model.capture import capture_block_inputs, run_block
from lowbit.model.loading import family_of
from lowbit.model.targets import select_layers
from lowbit.pipeline import transform_block
from lowbit.recipe import Recipe
from lowbit.runtime.lowp import codes_matmul, weight_operand

CALIB = CalibConfig("c4", 8, 128)


def _calibration_inputs(model, tokenizer):
    from lowbit.data.calibration import calibration_ids

    ids = calibration_ids(tokenizer, CALIB, model.config.max_position_embeddings)
    return capture_block_inputs(model, family_of(model), ids, "cpu")


def _transform_blocks(model, tokenizer, recipe: Recipe, transform) -> list[dict]:
    """Run a block transform over every block of a float model (no rounding), as the pipeline does."""
    family = family_of(model)
    plan = select_layers(model, family, recipe)
    inputs = _calibration_inputs(model, tokenizer)
    cfg = recipe.config(transform.Config)
    chosen = []
    for i, block in enumerate(model.get_submodule(family.blocks)):
        prefix = f"{family.blocks}.{i}."
        specs = {n[len(prefix):]: s for n, s in plan.items() if n.startswith(prefix)}
        masters = {n: p.data for n, p in block.named_parameters()}
        scales = transform_block(block, i, masters, specs, family, transform, cfg, inputs, "cpu", None)
        chosen.append({"alpha": scales.alpha})
        inputs = run_block(block, inputs, "cpu")
    return chosen


def _assert_same_logits(a, b, ids):
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert (la - lb).norm() <= 1e-5 * lb.norm(), ((la - lb).norm() / lb.norm()).item()


@pytest.mark.parametrize("method", ["awq", "smoothquant", "smoothquant-all"])
def test_scaling_leaves_float_logits_unchanged(stories, stories_tokenizer, story_ids, method):
    """Before any rounding, the folded scales (searched α; no AWQ clipping, which does change weights) give the
    float model's logits to 1e-5 relative — and the scales really moved the weights."""
    before = copy.deepcopy(stories)
    if method == "awq":
        recipe = Recipe(method="awq", scheme="w3a16", group_size=0, options={"awq_clip": False})
        chosen = _transform_blocks(stories, stories_tokenizer, recipe, awq)
    else:
        recipe = Recipe(method="smoothquant", scheme="w8a8",
                        options={"alpha": 0.5, "smooth_all": method == "smoothquant-all"})
        chosen = _transform_blocks(stories, stories_tokenizer, recipe, smoothquant)
    assert all(c["alpha"] for c in chosen)
    assert all(("mlp.up_proj" in c["alpha"]) == (method != "smoothquant") for c in chosen)
    moved = stories.model.layers[1].input_layernorm.weight
    assert not torch.allclose(moved, before.model.layers[1].input_layernorm.weight)
    _assert_same_logits(stories, before, story_ids)


def test_fold_through_every_scaling_group():
    """Random positive scales folded into every group of a Llama block with as many key/value heads as query heads
    (so v_proj → o_proj is a group too) leave its logits unchanged. A tiny random model: only equality is claimed."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    before = copy.deepcopy(model)
    family = family_of(model)
    for block in model.model.layers:
        groups = active_groups(block, family.scaling, {n for g in family.scaling for n in g.layers})
        assert [g.prev for g in groups] == ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm",
                                            "mlp.up_proj"]
        masters = {n: p.data for n, p in block.named_parameters()}
        for g in groups:
            fold(block, masters, g, torch.exp(torch.randn(block.get_submodule(g.layers[0]).in_features)))
    _assert_same_logits(model, before, torch.randint(0, 64, (2, 16)))


def test_gqa_skips_the_v_to_o_group(stories):
    family = family_of(stories)
    groups = active_groups(stories.model.layers[0], family.scaling, {"self_attn.o_proj", "mlp.down_proj"})
    assert [g.prev for g in groups] == ["mlp.up_proj"]  # stories260K has 4 key/value heads for 8 query heads


def _block_errors(model, tokenizer, recipe):
    result = api.quantize(copy.deepcopy(model), recipe, tokenizer=tokenizer, calib=CALIB, device="cpu",
                          compute_dtype="float32", progress=False)
    return [b.output_error for b in result.pipeline.blocks]


@pytest.mark.parametrize("scheme,group", [("w3a16", 0), ("w4a16", 0)])
def test_awq_beats_rtn_on_block_outputs(stories, stories_tokenizer, scheme, group):
    rtn = _block_errors(stories, stories_tokenizer, Recipe(scheme=scheme, group_size=group))
    awq_errors = _block_errors(stories, stories_tokenizer, Recipe(method="awq", scheme=scheme, group_size=group))
    assert sum(awq_errors) < 0.8 * sum(rtn)


def test_smoothquant_beats_naive_w8a8_with_static_per_tensor_activations(stories, stories_tokenizer):
    naive = _block_errors(stories, stories_tokenizer, Recipe(scheme="w8a8", per_tensor=True, act_granularity="tensor",
                                                             act_static=True))
    smooth = _block_errors(stories, stories_tokenizer, Recipe.preset("smoothquant-o3"))
    assert sum(smooth) < sum(naive)


def test_smoothquant_with_gptq_weights_beats_rounded_weights(stories, stories_tokenizer):
    rounded = _block_errors(stories, stories_tokenizer, Recipe(method="smoothquant", scheme="w8a8",
                                                                   options={"alpha": 0.5}))
    gptq = _block_errors(stories, stories_tokenizer, Recipe(method="smoothquant+gptq", scheme="w8a8",
                                                                    options={"alpha": 0.5}))
    assert sum(gptq) < sum(rounded)


def test_awq_clip_matches_a_brute_force_search():
    """The clipping search returns, per group, the shrink whose output error on the tokens is smallest."""
    torch.manual_seed(1)
    w, x = torch.randn(6, 16), torch.randn(40, 16) * torch.linspace(0.1, 3, 16)
    fmt = IntFormat(3, True, PerChannel())
    clipped = clamp_layer(w, awq.clip_factors(w, x, fmt), fmt)
    errors = []
    for i in range(int(awq.CLIP_GRID * awq.CLIP_MAX_SHRINK) + 1):
        p = 1 - i / awq.CLIP_GRID
        amax = w.abs().amax(1, keepdim=True) * p
        wq = quantize(torch.minimum(torch.maximum(w, -amax), amax), fmt).dequantize()
        errors.append(((wq - w) @ x.t()).pow(2).sum(1))
    best = torch.stack(errors).min(0).values
    got = ((quantize(clipped, fmt).dequantize() - w) @ x.t()).pow(2).sum(1)
    torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-6)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("granularity", ["token", "tensor"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("rows", [37, 8])
def test_native_matmul_equals_the_emulation(kind, granularity, device, rows):
    """int8: torch._int_mm and the float64 emulation give the same bits; fp8: torch._scaled_mm agrees to the
    rounding of its accumulator. Both agree with F.linear on the dequantized operands. 8 rows: cuBLAS needs
    padding."""
    torch.manual_seed(2)
    x, w = (torch.randn(rows, 96) * 3).to(device), (torch.randn(48, 96) * 0.05).to(device)
    act = ActFormat(kind, granularity)
    fmt = IntFormat(8, True, PerChannel()) if kind == "int8" else FP8Format(PerChannel())
    qw = quantize(w, fmt)
    operand = weight_operand(qw, act)
    assert operand is not None
    native = codes_matmul(x, act, None, *operand, mode="native")
    emulated = codes_matmul(x, act, None, *operand, mode="emulate")
    if kind == "int8":
        assert torch.equal(native, emulated)
    else:  # the CPU sums in float32; Hopper's fp8 tensor cores keep fewer accumulator bits (about 2^-14)
        tol = 1e-6 if device == "cpu" else 1e-3
        torch.testing.assert_close(native, emulated, rtol=tol, atol=tol * emulated.abs().max().item())
    dequantized = fake_quantize_activation(x, act) @ qw.dequantize().t()
    torch.testing.assert_close(emulated, dequantized, rtol=1e-5, atol=1e-5 * dequantized.abs().max().item())


def test_grouped_or_narrow_weights_take_the_dequantized_path():
    w = torch.randn(8, 32)
    assert weight_operand(quantize(w, IntFormat(8, True, PerTensor())), ActFormat("int8")) is not None
    assert weight_operand(quantize(w, IntFormat(4, True, PerChannel())), ActFormat("int8")) is None
    assert weight_operand(quantize(w, IntFormat(8, False, PerChannel())), ActFormat("int8")) is None


@pytest.mark.parametrize("recipe", [Recipe(method="awq", scheme="w4a16", group_size=4),
                                    Recipe.preset("smoothquant-o3"), Recipe.preset("smoothquant-o1"),
                                    Recipe(method="fp8", scheme="fp8")],
                         ids=["awq", "smoothquant-o3", "smoothquant-o1", "fp8"])
def test_checkpoint_round_trip_gives_identical_logits(stories, stories_tokenizer, story_ids, recipe, tmp_path):
    result = api.quantize(stories, recipe, tokenizer=stories_tokenizer, calib=CALIB, device="cpu", progress=False)
    api.save(result, tmp_path / "q", tokenizer=stories_tokenizer)
    loaded = api.load(tmp_path / "q")
    with torch.no_grad():
        expected = result.model(story_ids).logits
        got = loaded(story_ids).logits
    assert torch.equal(got, expected)
    if recipe.act_static:
        scales = [m.input_scale for m in loaded.modules() if getattr(m, "input_scale", None) is not None]
        assert len(scales) == result.sizes["quantized_layers"] and all(s > 0 for s in scales)


def test_static_scale_needs_calibration_or_fails_clearly(stories):
    recipe = Recipe(scheme="w8a8", act_granularity="tensor", act_static=True, targets=("lm_head",))
    with pytest.raises(LowbitError, match="outside them"):
        api.quantize(stories, recipe, progress=False)


@pytest.mark.parametrize("bad,match", [
    (dict(method="smoothquant", scheme="w4a16"), "keeps them in 16 bits"),
    (dict(scheme="w4a16", act_static=True), "keeps activations in 16 bits"),
    (dict(scheme="w8a8", act_static=True), "one per tensor"),
    (dict(method="smoothquant", scheme="w8a8", options={"alpha": 1.5}), r"\[0, 1\]"),
    (dict(scheme="w8a8", kv_cache="int4"), "--kv-cache int8 or fp8"),
    (dict(method="awq", scheme="w4a16", options={"smooth_all": True}), "awq has no option 'smooth_all'"),
    (dict(scheme="w4a16", parts=("L3",)), "add --kv-cache"),
])
def test_bad_options_are_explained(bad, match):
    with pytest.raises(LowbitError, match=match):
        Recipe(**bad)


def test_fake_quantized_reference_takes_static_scales(stories, stories_tokenizer, story_ids):
    recipe = Recipe(scheme="w8a8", per_tensor=True, act_granularity="tensor", act_static=True)
    float_model = copy.deepcopy(stories)
    result = api.quantize(stories, recipe, tokenizer=stories_tokenizer, calib=CALIB, device="cpu", progress=False)
    with pytest.raises(LowbitError, match="input_scales"):
        api.fake_quantize_model(float_model, result.plan, result.dtype)
    scales = {n: m.input_scale for n, m in result.model.named_modules() if getattr(m, "input_scale", None) is not None}
    fake = api.fake_quantize_model(float_model, result.plan, result.dtype, input_scales=scales)
    with torch.no_grad():
        expected, got = result.model(story_ids).logits, fake(story_ids).logits
    assert (got - expected).norm() <= 1e-4 * expected.norm()


def test_saved_scales_reapply_to_the_same_checkpoint(stories, stories_tokenizer, story_ids, tmp_path):
    """AWQ's scales and clipping ranges are saved beside the checkpoint; --reuse-scales applies them without a
    search and gives the same model. Scales of another method, or a broken file, are refused."""
    recipe = Recipe(method="awq", scheme="w4a16", group_size=0)
    first = api.quantize(copy.deepcopy(stories), recipe, tokenizer=stories_tokenizer, calib=CALIB, progress=False)
    api.save(first, tmp_path / "awq")
    assert (tmp_path / "awq" / "scales.safetensors").is_file() and first.pipeline.scales[0].clip
    again = api.quantize(copy.deepcopy(stories), recipe, progress=False, reuse_scales=tmp_path / "awq")  # no data
    with torch.no_grad():
        assert torch.equal(again.model(story_ids).logits, first.model(story_ids).logits)
    assert [b.transform for b in again.pipeline.blocks] == [b.transform for b in first.pipeline.blocks]
    sq = Recipe(method="smoothquant", scheme="w8a8")
    with pytest.raises(LowbitError, match="holds awq scales, and this run's method uses smoothquant's"):
        api.quantize(copy.deepcopy(stories), sq, tokenizer=stories_tokenizer, calib=CALIB, progress=False,
                     reuse_scales=tmp_path / "awq")
    with pytest.raises(LowbitError, match="method rtn folds no scales"):
        api.quantize(copy.deepcopy(stories), Recipe(), progress=False, reuse_scales=tmp_path / "awq")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LowbitError, match="could not read scales from"):
        api.quantize(copy.deepcopy(stories), recipe, tokenizer=stories_tokenizer, calib=CALIB, progress=False,
                     reuse_scales=tmp_path / "bad.safetensors")
    with pytest.raises(LowbitError, match="do not fit a weight"):  # ranges searched per channel, not in groups
        api.quantize(copy.deepcopy(stories), Recipe(method="awq", scheme="w4a16", group_size=4),
                     tokenizer=stories_tokenizer, calib=CALIB, progress=False, reuse_scales=tmp_path / "awq")
