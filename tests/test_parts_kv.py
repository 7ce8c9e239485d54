"""--parts (named groups, Fireworks levels) and KV-cache / attention quantization."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

import lowbit
from lowbit import api
from lowbit.errors import LowbitError
from lowbit.model.loading import family_of
from lowbit.model.targets import select_layers
from lowbit.recipe import Recipe
from lowbit.runtime import kvcache


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_kv_quantization_round_trips_within_its_step(kind):
    torch.manual_seed(0)
    k = torch.randn(2, 3, 17, 64) * torch.logspace(-2, 2, 17).view(1, 1, -1, 1)
    k[0, 1, 4, 7] = 50.0  # an outlier sets its own token's scale only
    q = kvcache.quantize_kv(k, kind)
    amax = k.abs().amax(-1, keepdim=True)
    if kind == "int8":
        step = amax / 127
        assert ((q - k).abs() <= step / 2 * (1 + 1e-6)).all()
        assert torch.equal(torch.round(q / step), torch.round(q / step).clamp(-127, 127))
    else:  # e4m3: 3 mantissa bits, so a relative error of at most 2^-4 (normal values)
        normal = k.abs() >= amax / 448 * 2**-6
        assert ((q - k).abs()[normal] <= k.abs()[normal] * 2**-4 * (1 + 1e-6)).all()
    if kind == "int8":  # the top code keeps the token's scale: rounding again changes nothing
        assert torch.equal(kvcache.quantize_kv(q, kind), q)


def test_cache_stores_quantized_keys_and_generation_agrees_with_teacher_forcing(stories, stories_tokenizer):
    ids = stories_tokenizer("Once upon a time, there was a little girl named Lily.", return_tensors="pt").input_ids
    model = kvcache.enable(stories, "int8")
    cache = kvcache.QuantizedKVCache("int8")
    with torch.no_grad():
        model(ids, past_key_values=cache)
        keys = cache.layers[0].keys
        assert torch.equal(kvcache.quantize_kv(keys, "int8"), keys)
        generated = model.generate(ids, max_new_tokens=12, do_sample=False)
        forced = model(generated, use_cache=False).logits[0, ids.shape[1] - 1:-1].argmax(-1)
    assert torch.equal(forced, generated[0, ids.shape[1]:])  # decode step by step = one teacher-forced pass


def test_attention_quantizes_queries_in_prefill_only(stories, story_ids):
    plain = kvcache.enable(copy.deepcopy(stories), "int8")
    quantized = kvcache.enable(stories, "int8", attention=True)
    cache = kvcache.QuantizedKVCache("int8")
    with torch.no_grad():
        prefill = plain(story_ids, past_key_values=cache).logits
        assert not torch.allclose(quantized(story_ids).logits, prefill)
        step = story_ids[:, :1]
        expected = plain(step, past_key_values=copy.deepcopy(cache)).logits
        got = quantized(step, past_key_values=copy.deepcopy(cache)).logits
    assert torch.equal(got, expected)


def test_fresh_dynamic_cache_is_replaced_but_a_filled_one_is_kept(stories):
    model = kvcache.enable(stories, "fp8")
    seen = []
    model.model.register_forward_pre_hook(  # transformers ≥ 5.24 names the argument `cache`
        lambda m, a, kw: seen.append(type(kw.get("cache", kw.get("past_key_values")))), with_kwargs=True)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), past_key_values=DynamicCache())
    assert seen == [kvcache.QuantizedKVCache]
    with pytest.raises(LowbitError, match="already"):
        kvcache.enable(model, "int8")


@pytest.mark.parametrize("parts,attention", [("kv_cache", False), ("L4", True)])
def test_kv_and_attention_survive_the_checkpoint(stories, stories_tokenizer, story_ids, tmp_path, parts, attention):
    recipe = Recipe(scheme="fp8", parts=(parts,))
    result = api.quantize(stories, recipe, progress=False)
    api.save(result, tmp_path / "q", tokenizer=stories_tokenizer)
    loaded = lowbit.load(tmp_path / "q")
    assert loaded.lowbit_kv_cache == "fp8"
    assert (loaded.config._attn_implementation == "lowbit_qfp8") == attention
    with torch.no_grad():
        assert torch.equal(loaded(story_ids).logits, result.model(story_ids).logits)


def test_parts_on_stories(stories):
    family = family_of(stories)
    names = lambda parts: set(select_layers(stories, family, Recipe(scheme="fp8", parts=parts)))  # noqa: E731
    l1 = names(("L1",))
    assert l1 == {f"model.layers.{i}.mlp.{p}_proj" for i in (1, 2, 3) for p in ("gate", "up", "down")}
    assert names(("mlp", "qkv", "first_last")) == names(("L2",)) == names(("L4",))
    assert names(("o_proj", "first_last", "lm_head")) == {f"model.layers.{i}.self_attn.o_proj" for i in range(5)} | {
        "lm_head"}
    with pytest.raises(LowbitError, match="unknown part 'mlps'"):
        Recipe(parts=("mlps",))
    with pytest.raises(LowbitError, match="add --kv-cache"):
        Recipe(scheme="w4a16", parts=("L3",))
    with pytest.raises(LowbitError, match="either --parts or --targets"):
        select_layers(stories, family, Recipe(parts=("mlp",), targets=("proj",)))


@pytest.mark.slow
def test_fireworks_levels_on_smollm2():
    """L1–L4 select exactly the intended modules of SmolLM2-135M, by name (30 blocks)."""
    model = lowbit.load("smollm2-135m")
    family = family_of(model)

    def plan(level):
        return set(select_layers(model, family, Recipe(scheme="fp8", parts=(level,))))

    mlp = {f"model.layers.{i}.mlp.{p}_proj" for i in range(30) for p in ("gate", "up", "down")}
    qkv = {f"model.layers.{i}.self_attn.{p}_proj" for i in range(30) for p in ("q", "k", "v")}
    inner = {n for n in mlp if not n.startswith(("model.layers.0.", "model.layers.29."))}
    assert plan("L1") == inner and len(inner) == 84
    assert plan("L2") == plan("L3") == plan("L4") == mlp | qkv
    recipes = {lv: Recipe(scheme="fp8", parts=(lv,)) for lv in ("L1", "L2", "L3", "L4")}
    assert [r.kv_cache for r in recipes.values()] == [None, None, "fp8", "fp8"]
    assert ["attention" in r.parts for r in recipes.values()] == [False, False, False, True]
    result = api.quantize(copy.deepcopy(model), recipes["L4"], progress=False)
    assert result.model.lowbit_kv_cache == "fp8" and result.sizes["quantized_layers"] == 180
