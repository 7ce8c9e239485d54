"""Recipes: schemes, YAML round trip, targets/ignore/overrides resolved against a real model, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lowbit.errors import LowbitError
from lowbit.formats import FP8Format, IntFormat, PerChannel, PerGroup
from lowbit.model.loading import family_of
from lowbit.model.targets import fit_group_size, select_layers
from lowbit.recipe import Override, Recipe, scheme_spec

LINEAR_KINDS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_named_schemes():
    assert scheme_spec("w4a16", 64, True, False).weight == IntFormat(4, True, PerGroup(64))
    assert scheme_spec("w8a16", None, True, False).weight == IntFormat(8, True, PerChannel())
    assert scheme_spec("w3a16", None, False, False).weight.granularity == PerGroup(128)
    w8a8 = scheme_spec("w8a8", None, True, False)
    assert w8a8.weight.bits == 8 and w8a8.act.kind == "int8"
    fp8 = scheme_spec("fp8", None, True, False)
    assert isinstance(fp8.weight, FP8Format) and fp8.act.kind == "fp8"
    assert scheme_spec("W6A16", 0, True, False).weight.bits == 6


@pytest.mark.parametrize("scheme,message", [("w9a16", "2 to 8"), ("w1a16", "2 to 8"), ("int4", "unknown scheme"),
                                            ("w4a4", "unknown scheme")])
def test_bad_schemes(scheme, message):
    with pytest.raises(LowbitError, match=message):
        Recipe(scheme=scheme)


def test_yaml_round_trip(tmp_path):
    recipe = Recipe(method="rtn", scheme="w4a16", group_size=32, symmetric=False, clip=True, zero_point="float",
                    ignore=(r"layers\.0\.",),
                    overrides=(Override(pattern="down_proj", scheme="w8a16"),
                               Override(pattern=r"layers\.4\.", skip=True)))
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert Recipe.from_yaml(path) == recipe
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_yaml_errors(tmp_path):
    with pytest.raises(LowbitError, match="does not exist"):
        Recipe.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheme: w4a16\ngroupsize: 64\n")
    with pytest.raises(LowbitError, match=r"unknown key.*groupsize"):
        Recipe.from_yaml(bad)
    bad.write_text("scheme: [unclosed\n")
    with pytest.raises(LowbitError, match="not valid YAML"):
        Recipe.from_yaml(bad)
    bad.write_text("overrides:\n  - scheme: w8a16\n")
    with pytest.raises(LowbitError, match="'pattern'"):
        Recipe.from_yaml(bad)
    with pytest.raises(LowbitError, match="not a valid regular expression"):
        Recipe(ignore=("layers.(",))


def test_default_targets_are_block_linears(stories):
    plan = select_layers(stories, family_of(stories), Recipe(scheme="w4a16", group_size=0))
    assert len(plan) == 5 * 7
    assert {n.rsplit(".", 1)[-1] for n in plan} == LINEAR_KINDS
    assert all(n.startswith("model.layers.") for n in plan)


def test_targets_ignore_and_overrides(stories):
    family = family_of(stories)
    recipe = Recipe(scheme="w4a16", group_size=0, targets=(r"mlp\.", "lm_head"), ignore=(r"layers\.0\.",),
                    overrides=(Override(pattern="down_proj", scheme="w8a16"),
                               Override(pattern=r"layers\.4\.", skip=True),
                               Override(pattern="lm_head", group_size=4)))
    plan = select_layers(stories, family, recipe)
    mlp = {f"model.layers.{i}.mlp.{k}" for i in (1, 2, 3) for k in ("gate_proj", "up_proj", "down_proj")}
    assert set(plan) == mlp | {"lm_head"}
    assert plan["model.layers.2.mlp.down_proj"].weight == IntFormat(8, True, PerChannel(), full_range=True)
    assert plan["model.layers.2.mlp.up_proj"].weight == IntFormat(4, True, PerChannel(), full_range=True)
    assert plan["lm_head"].weight.granularity == PerGroup(4)


def test_selection_errors(stories):
    family = family_of(stories)
    with pytest.raises(LowbitError, match="no linear layer matched"):
        select_layers(stories, family, Recipe(group_size=0, targets=("nothing_like_this",)))
    with pytest.raises(LowbitError, match="matches none"):
        select_layers(stories, family, Recipe(group_size=0, overrides=(Override(pattern="attn_typo", skip=True),)))
    with pytest.raises(LowbitError, match="skip every"):
        select_layers(stories, family, Recipe(group_size=0, overrides=(Override(pattern="proj", skip=True),)))


@pytest.mark.parametrize("group", [128, 64, 8, 3])
def test_group_sizes_that_do_not_divide_are_refused_with_alternatives(stories, group):
    # hidden 64 and intermediate 172: only 1, 2 and 4 divide both
    with pytest.raises(LowbitError, match=r"Group sizes that divide every targeted layer: 1, 2, 4\."):
        select_layers(stories, family_of(stories), Recipe(scheme="w4a16", group_size=group))


def test_per_channel_and_dividing_groups_work(stories):
    for group in (0, -1, 4):
        assert len(select_layers(stories, family_of(stories), Recipe(scheme="w4a16", group_size=group))) == 35


@pytest.mark.parametrize("argv,method,full", [
    ([], "rtn", True), (["--method", "gptq"], "gptq", True), (["--method", "awq"], "awq", False),
    (["--method", "awq", "--full-range"], "awq", True), (["--restricted-range"], "rtn", False),
])
def test_full_range_default_depends_on_the_method(argv, method, full):
    from lowbit.cli import _recipe_from_args, build_parser

    args = build_parser().parse_args(["quantize", "m", "--out", "o", "--scheme", "w4a16", *argv])
    recipe = _recipe_from_args(args)
    assert recipe.method == method and recipe.uses_full_range == full
    assert recipe.default_spec.weight.full_range == full
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_full_and_restricted_range_exclude_each_other(capsys):
    from lowbit.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "m", "--out", "o", "--full-range", "--restricted-range"])
    assert "not allowed with" in capsys.readouterr().err


def test_method_options_round_trip_and_keep_only_what_differs(tmp_path):
    from lowbit.methods.gptq import GPTQConfig

    recipe = Recipe(method="GPTQ", scheme="w4a16", group_size=32, options={"act_order": True, "damp": 0.01,
                                                                          "block_size": 64})
    assert recipe.method == "gptq" and recipe.options == {"act_order": True, "block_size": 64}
    assert recipe.config(GPTQConfig) == GPTQConfig(block_size=64, damp=0.01, act_order=True)
    assert recipe.to_dict()["options"] == {"block_size": 64, "damp": 0.01, "act_order": True}  # every option
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert Recipe.from_yaml(path) == recipe
    assert recipe.option("act_order") is True and Recipe().option("act_order") is None
    assert recipe.with_options(options={"damp": 0.05}).options == {"act_order": True, "block_size": 64, "damp": 0.05}


def test_combined_method_takes_the_options_of_both_parts():
    from lowbit.methods.gptq import GPTQConfig
    from lowbit.methods.smoothquant import SmoothQuantConfig

    recipe = Recipe(method="smoothquant+gptq", scheme="w8a8", options={"alpha": 0.5, "damp": 0.02})
    assert recipe.config(SmoothQuantConfig).alpha == 0.5 and recipe.config(GPTQConfig).damp == 0.02


def test_recipes_written_with_flat_method_options_still_load():
    old = {"lowbit_recipe": 1, "method": "spqr", "scheme": "w3a16", "group_size": 16, "symmetric": False,
           "act_order": False, "damp": 0.01, "block_size": 128, "stat_bits": 3, "stat_group": 4,
           "outlier_threshold": None, "outlier_rate": 0.01, "alpha": None, "smooth_all": False, "awq_clip": True}
    recipe = Recipe.from_dict(old)
    assert recipe.options == {"outlier_rate": 0.01, "stat_group": 4}
    assert recipe.default_spec.weight.beta2 == 4


def test_a_flat_recipe_keeps_the_column_order_it_was_written_with():
    old = {"lowbit_recipe": 1, "method": "gptq", "scheme": "w4a16", "group_size": 64, "act_order": False,
           "damp": 0.01, "block_size": 128, "stat_bits": 3, "smooth_all": False}
    assert Recipe.from_dict(old).option("act_order") is False  # then the default; act-order is the default now
    assert Recipe.from_dict({**old, "method": "rtn"}).options == {}  # RTN has no such option
    assert Recipe.from_dict({k: v for k, v in old.items() if k != "act_order"}).option("act_order") is None


@pytest.mark.parametrize("method,options,match", [
    ("gptq", {"alpha": 0.5}, r"method gptq has no option 'alpha'; its options are block_size, damp, act_order"),
    ("rtn", {"damp": 0.1}, r"method rtn has no option 'damp'; it has none"),
    ("gptq", {"damp": "high"}, r"option 'damp' must be float, got 'high'"),
    ("gptq", {"act_order": 1}, r"option 'act_order' must be bool"),
    ("gptq", {"block_size": 0}, r"block size ≥ 1"),
    ("spqr", {"outlier_rate": 0.7}, r"outlier rate must be in \[0, 0\.5\)"),
    ("awq", {"smooth_all": True}, r"awq has no option 'smooth_all'"),
])
def test_method_options_are_checked(method, options, match):
    scheme = "w8a8" if method.startswith("smoothquant") else "w4a16"
    with pytest.raises(LowbitError, match=match):
        Recipe(method=method, scheme=scheme, group_size=16, options=options)


def test_a_flag_of_another_method_is_an_error_not_ignored():
    from lowbit.cli import _recipe_from_args, build_parser

    args = build_parser().parse_args(["quantize", "m", "--out", "o", "--method", "gptq", "--alpha", "0.5"])
    with pytest.raises(LowbitError, match="method gptq has no option 'alpha'"):
        _recipe_from_args(args)
    args = build_parser().parse_args(["quantize", "m", "--out", "o", "--method", "awq", "--no-awq-clip"])
    assert _recipe_from_args(args).options == {"awq_clip": False}


def test_the_readme_lists_every_method_option():
    import re
    from dataclasses import fields
    from pathlib import Path

    from lowbit.methods.registry import METHODS

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| ((?:`[a-z0-9+]+`(?:, )?)+) \| (.*) \|$", readme, re.M)
    listed: dict[str, set[str]] = {}
    for methods, cell in rows:
        names = set() if cell == "none" else {m.group(1) for m in re.finditer(r"`([a-z_0-9]+)`", cell)}
        for method in re.findall(r"`([a-z0-9+]+)`", methods):
            listed.setdefault(method, set()).update(names)
    assert set(listed) == set(METHODS)
    for name, entry in METHODS.items():
        options = [f.name for cls in entry.configs for f in fields(cls)]
        assert len(options) == len(set(options)), f"{name}: its parts' options share a name"
        assert listed[name] == set(options), name


def _smollm2_widths(layers: int = 1):
    """A model with SmolLM2-135M's layer widths (hidden 576 = 4.5 × 128, MLP 1536), small otherwise."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def test_the_default_group_size_is_fitted_to_the_model(stories):
    model = _smollm2_widths()
    family = family_of(model)
    fitted, note = fit_group_size(model, family, Recipe(method="gptq"))
    assert fitted.group_size == 64 and "128 does not divide the input dimension 576" in note
    assert {s.weight.granularity for s in select_layers(model, family, fitted).values()} == {PerGroup(64)}
    # a group size the user gave is kept, and refused where it does not divide
    given = Recipe(method="gptq", group_size=128)
    assert fit_group_size(model, family, given) == (given, None)
    with pytest.raises(LowbitError, match="group size 128 does not divide"):
        select_layers(model, family, given)
    # where the default divides (w2a16: 64), or is not a group size (w8a16: per channel), nothing changes
    for recipe in (Recipe(scheme="w2a16"), Recipe(scheme="w8a16"), Recipe(per_tensor=True)):
        assert fit_group_size(model, family, recipe) == (recipe, None)
    # stories260K (64 and 172 columns): no size of 64 or 32 fits either; the usual refusal says what does
    recipe = Recipe()
    assert fit_group_size(stories, family_of(stories), recipe) == (recipe, None)


def test_the_fitted_group_size_is_said_and_recorded(tmp_path, stories_tokenizer):
    _smollm2_widths(2).save_pretrained(tmp_path / "m")
    stories_tokenizer.save_pretrained(tmp_path / "m")
    run = subprocess.run([sys.executable, "-m", "lowbit", "quantize", str(tmp_path / "m"), "--out",
                          str(tmp_path / "q"), "--device", "cpu"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "group size 64, chosen automatically" in run.stderr
    assert "group size   64, chosen automatically" in run.stdout
    header = json.loads((tmp_path / "q" / "lowbit.json").read_text())
    assert header["recipe"]["group_size"] == 64 and "576" in header["group_size_auto"]
