"""The Python API: lowbit.quantize / evaluate / Recipe / export as documented, with models or paths."""

from __future__ import annotations

import pytest
import torch

import lowbit


def test_quantize_takes_a_scheme_name_a_mapping_or_a_recipe(stories_path, capfd):
    by_name = lowbit.quantize(stories_path, "w4a16", method="gptq", group_size=4, act_order=True,
                              calib={"samples": 4, "seqlen": 64}, progress=False)
    assert (by_name.recipe.method, by_name.recipe.group_size, by_name.recipe.option("act_order")) == ("gptq", 4, True)
    assert by_name.calib.samples == 4
    by_mapping = lowbit.quantize(stories_path, {"scheme": "w8a16", "ignore": ["down_proj"]}, progress=False)
    assert by_mapping.recipe.scheme == "w8a16" and not any("down_proj" in n for n in by_mapping.plan)
    recipe = lowbit.Recipe.of("w4a16", group_size=4)
    assert lowbit.quantize(stories_path, recipe, progress=False).recipe == recipe
    # progress=False: no bar of lowbit's or of transformers' ("Loading weights")
    assert "Loading weights" not in capfd.readouterr().err


@pytest.mark.parametrize("args,kwargs,message", [
    ((3,), {}, "a recipe is a scheme's name"),
    (("int4",), {}, "unknown scheme 'int4'"),
    (("w4a16",), {"method": "rtn", "act_order": True}, "method rtn has no option 'act_order'"),
    (("w4a16",), {"calib": {"sample": 4}}, "unknown calibration setting(s) 'sample'"),
])
def test_bad_settings_are_refused_with_what_is_allowed(stories_path, args, kwargs, message):
    with pytest.raises(lowbit.LowbitError) as e:
        lowbit.quantize(stories_path, *args, group_size=4, progress=False, **kwargs)
    assert message in str(e.value)


def test_evaluate_models_in_memory_or_on_disk(stories_path, tmp_path):
    result = lowbit.quantize(stories_path, "w4a16", group_size=4, progress=False)
    lowbit.save(result, tmp_path / "q")
    settings = {"max_prompts": 3, "max_new_tokens": 12, "progress": False}
    on_disk = lowbit.evaluate(stories_path, tmp_path / "q", **settings)
    in_memory = lowbit.evaluate(lowbit.load(stories_path, progress=False), result.model, **settings)
    assert isinstance(in_memory, lowbit.EvalResult)
    assert in_memory.kl_mean == pytest.approx(on_disk.kl_mean, rel=1e-5) and in_memory.kl_mean > 0
    assert in_memory.to_dict()["kl"]["all"]["mean"] == in_memory.kl_mean
    assert in_memory.size["bits_per_weight"] == pytest.approx(on_disk.size["bits_per_weight"])
    assert "in memory" in in_memory.candidate and in_memory.size["bytes"] is None
    with pytest.raises(lowbit.LowbitError, match="unknown evaluation setting"):
        lowbit.evaluate(stories_path, result.model, max_promts=3)
    nameless = lowbit.load(stories_path, progress=False)
    nameless.name_or_path = result.model.name_or_path = ""  # then neither says where its tokenizer is
    with pytest.raises(lowbit.LowbitError, match="give tokenizer=PATH"):
        lowbit.evaluate(nameless, result.model, **settings)
    assert lowbit.evaluate(nameless, result.model, tokenizer=str(stories_path), **settings).kl_mean == \
        pytest.approx(on_disk.kl_mean, rel=1e-5)
    if torch.cuda.is_available():  # a model on the CPU is not moved behind the caller's back
        with pytest.raises(lowbit.LowbitError, match="move the model"):
            lowbit.evaluate(stories_path, result.model, device="cuda", **settings)
