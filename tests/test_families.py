"""Every architecture family on a tiny model built from its transformers configuration: the real structure (head
counts, grouped-query ratio, sliding-window pattern, norm placement, tied embeddings, experts and top-k), shrunk in
width and depth. Each quantizes with the methods it takes, its scaling groups leave the float model unchanged, its
checkpoint reloads to identical logits, and `--parts` picks the intended layers."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM

import lowbit
from lowbit import api
from lowbit.data.calibration import CalibConfig
from lowbit.errors import LowbitError
from lowbit.methods.scaling import active_groups, fold
from lowbit.model.adapt import ExpertMLPs, adapt
from lowbit.model.architectures import FAMILIES, decoder_blocks, families_markdown
from lowbit.model.loading import family_of
from lowbit.recipe import Recipe
from lowbit.runtime.qlinear import QuantLinear

CALIB = CalibConfig("c4", 4, 64)
VOCAB, HIDDEN = 512, 64
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _gemma3_text(**kw):  # Gemma 3 1B: 4 query heads, 1 key/value head, five sliding-window layers per global one
    return tf.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=6,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=16,
                               query_pre_attn_scalar=16, tie_word_embeddings=True, **kw)


CONFIGS = {
    # Gemma 2B: multi-query attention (1 key/value head), 1 + w norms, tied embeddings
    "gemma": lambda: tf.GemmaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=8, num_key_value_heads=1, head_dim=8),
    # Gemma 2 2B: 8 query / 4 key-value heads, sliding and global layers alternating, soft-capped logits
    "gemma2": lambda: tf.Gemma2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=4, head_dim=8, sliding_window=16,
                                      query_pre_attn_scalar=8, attn_logit_softcapping=50.0,
                                      final_logit_softcapping=30.0),
    "gemma3_text": _gemma3_text,
    "gemma3": lambda: tf.Gemma3Config(
        text_config=_gemma3_text().to_dict(), mm_tokens_per_image=4,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14)),
    # OLMo 2 1B: norms after the sub-layers, q/k norms over all heads, 16 heads without grouping
    "olmo2": lambda: tf.Olmo2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=16, num_key_value_heads=16),
    # Phi-3 mini: fused qkv_proj and gate_up_proj, 32 heads without grouping (here 4)
    "phi3": lambda: tf.Phi3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4, pad_token_id=0),
    # Mixtral 8x7B: 8 experts, 2 per token, 32 query / 8 key-value heads
    "mixtral": lambda: tf.MixtralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
                                        num_experts_per_tok=2),
    # Qwen1.5-MoE: 4 experts per token plus a gated shared expert (60 experts, here 8)
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                                           moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                           num_experts=8, num_experts_per_tok=4),
    # Qwen3-30B-A3B: 8 experts per token (of 128, here 16), q/k norms, one dense block (mlp_only_layers)
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                                           moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=8,
                                           num_key_value_heads=2, head_dim=8, num_experts=16, num_experts_per_tok=8,
                                           mlp_only_layers=[1]),
    # OLMoE 1B-7B: 8 experts per token (of 64, here 16), q/k norms
    "olmoe": lambda: tf.OlmoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_experts=16, num_experts_per_tok=8),
    # GPT-2: Conv1D layers (weights stored [in, out]), learned positions, LayerNorm with biases, tied embeddings
    "gpt2": lambda: tf.GPT2Config(n_layer=2, n_embd=HIDDEN, n_head=4, vocab_size=VOCAB),
    # Llama 3.1: the llama3 rotary scaling
    "llama3": lambda: tf.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=2, rope_parameters=_LLAMA3_ROPE,
                                     max_position_embeddings=131072),
}
# The groups each family's first block scales (prev of each), and the layer kinds of --parts mlp.
GROUPS = {
    "gemma": ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"],  # MQA: no v → o
    "gemma2": ["input_layernorm", "pre_feedforward_layernorm", "mlp.up_proj"],
    "gemma3_text": ["input_layernorm", "pre_feedforward_layernorm", "mlp.up_proj"],
    "gemma3": ["input_layernorm", "pre_feedforward_layernorm", "mlp.up_proj"],
    "olmo2": ["self_attn.v_proj", "mlp.up_proj"],
    "phi3": ["input_layernorm", "self_attn.qkv_proj", "post_attention_layernorm", "mlp.gate_up_proj"],
    "mixtral": ["input_layernorm", "post_attention_layernorm", *[f"mlp.experts.{e}.up_proj" for e in range(8)]],
    "qwen2_moe": ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm",
                  *[f"mlp.experts.{e}.up_proj" for e in range(8)], "mlp.shared_expert.up_proj"],
    "qwen3_moe": ["input_layernorm", "post_attention_layernorm", *[f"mlp.experts.{e}.up_proj" for e in range(16)]],
    "olmoe": ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm",
              *[f"mlp.experts.{e}.up_proj" for e in range(16)]],
    "gpt2": ["ln_1", "attn.c_attn", "ln_2"],
    "llama3": ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"],
}
MLP = {"gpt2": {"c_fc", "c_proj"}, "phi3": {"gate_up_proj", "down_proj"}}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    offset = 1.0 if name.startswith("gemma") else 0.0  # Gemma's norms scale by 1 + w
    with torch.no_grad():  # norms away from their initial 1 (or 0), so that a wrong fold shows
        for n, p in model.named_parameters():
            if p.dim() == 1 and re.search(r"(norm|ln_\d)\.weight$", n):
                p.uniform_(0.5 - offset, 1.5 - offset)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scaling_groups_leave_the_float_model_unchanged(name):
    model = adapt(_model(name))
    before, ids = copy.deepcopy(model), _ids()
    family = family_of(model)
    for i, block in enumerate(decoder_blocks(model, family)):
        linears = {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        groups = active_groups(block, family.scaling, linears)
        if i == 0:
            assert [g.prev for g in groups] == GROUPS[name]
        masters = {n: p.data for n, p in block.named_parameters()}
        for g in groups:
            width = block.get_submodule(g.layers[0]).weight.shape[1]
            fold(block, masters, g, torch.exp(torch.randn(width, generator=torch.Generator().manual_seed(i))))
    torch.testing.assert_close(_logits(model, ids), _logits(before, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_family_quantizes_and_reloads(name, stories_tokenizer, tmp_path):
    """RTN, GPTQ, AWQ (w4 g16) and SmoothQuant (w8a8) run; GPTQ's and AWQ's checkpoints reload to identical logits."""
    model, ids = _model(name), _ids()
    reference = _logits(model, ids)
    for method, scheme in (("rtn", "w4a16"), ("gptq", "w4a16"), ("awq", "w4a16"), ("smoothquant", "w8a8")):
        result = api.quantize(copy.deepcopy(model), Recipe(method=method, scheme=scheme, group_size=16),
                              tokenizer=stories_tokenizer, calib=CALIB, progress=False)
        logits = _logits(result.model, ids)
        assert torch.isfinite(logits).all()
        assert 0 < (logits - reference).abs().mean() < reference.abs().mean()  # quantized, and still the model
        if method in ("gptq", "awq"):
            api.save(result, tmp_path / method)
            assert torch.equal(_logits(lowbit.load(tmp_path / method), ids), logits)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parts_select_the_intended_layers(name):
    model = _model(name)
    plan = api.select_layers(adapt(model), family_of(model), Recipe(parts=("mlp", "first_last"), group_size=16))
    kinds = {n.rsplit(".", 1)[1] for n in plan}
    assert kinds == MLP.get(name, {"gate_proj", "up_proj", "down_proj"})
    assert not any(re.search(r"\.(gate|shared_expert_gate)$", n) for n in plan)  # routers stay in 16 bits
    if name == "gemma3":
        assert all(n.startswith("model.language_model.layers.") for n in plan)  # the vision tower stays


def test_experts_are_counted_and_starved_ones_fall_back(stories_tokenizer, tmp_path):
    """Expert 3 is never routed a token (a hook on the router redirects it): it is calibrated on every token of its
    block, as with --experts-all-tokens, and the counts reach lowbit.json."""
    model = _model("mixtral")

    def never_three(_router, _args, out):
        logits, scores, index = out
        return logits, scores, torch.where(index == 3, (index + 1) % 8, index)

    for block in model.model.layers:
        block.mlp.gate.register_forward_hook(never_three)
    results = {}
    for all_tokens in (False, True):
        recipe = Recipe(method="gptq", scheme="w4a16", group_size=16, experts_all_tokens=all_tokens)
        results[all_tokens] = api.quantize(copy.deepcopy(model), recipe, tokenizer=stories_tokenizer, calib=CALIB,
                                           progress=False)
    routed, everything = results[False], results[True]
    api.save(routed, tmp_path / "moe")
    blocks = json.loads((tmp_path / "moe" / "lowbit.json").read_text())["blocks"]
    for b in blocks:
        counts = b["expert_tokens"]["mlp.experts"]
        assert counts[3] == 0 and sum(counts) == 4 * 64 * 2  # every calibration token, two experts each
        assert b["experts_on_all_tokens"]["mlp.experts"] == [3]
    assert everything.pipeline.blocks[0].experts_on_all_tokens["mlp.experts"] == list(range(8))
    for layer in ("gate_proj", "up_proj", "down_proj"):
        a = routed.model.get_submodule(f"model.layers.0.mlp.experts.3.{layer}")
        b = everything.model.get_submodule(f"model.layers.0.mlp.experts.3.{layer}")
        assert isinstance(a, QuantLinear)
        torch.testing.assert_close(a.dequantized_weight(), b.dequantized_weight(), rtol=0, atol=0)
        a0 = routed.model.get_submodule(f"model.layers.0.mlp.experts.0.{layer}")
        b0 = everything.model.get_submodule(f"model.layers.0.mlp.experts.0.{layer}")
        assert not torch.equal(a0.dequantized_weight(), b0.dequantized_weight())  # routed statistics differ


def test_experts_split_into_linear_layers_compute_the_same():
    model = _model("qwen2_moe")
    fused, ids = copy.deepcopy(model), _ids()
    adapt(model)
    assert isinstance(model.model.layers[0].mlp.experts, ExpertMLPs)
    torch.testing.assert_close(_logits(model, ids), _logits(fused, ids), rtol=1e-5, atol=1e-5)


def test_scaling_methods_refuse_layers_without_scales(stories_tokenizer):
    """OLMo 2's q/k/v read the raw residual stream: nothing before them can take AWQ's scales."""
    with pytest.raises(LowbitError, match=r"AWQ folds per-channel scales.*olmo2.*Use --method gptq or rtn"):
        api.quantize(_model("olmo2"), Recipe(method="awq", parts=("qkv", "first_last"), group_size=16),
                     tokenizer=stories_tokenizer, calib=CALIB, progress=False)


def test_readme_lists_the_families_of_the_table():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert families_markdown() in readme
    assert {t for f in FAMILIES for t in f.model_types} <= set(re.findall(r"`([a-z0-9_]+)`", families_markdown()))


def test_bad_expert_options_and_unwritten_exports_are_refused(tmp_path):
    from lowbit.io.export import export

    with pytest.raises(LowbitError, match="--expert-min-tokens must be at least 1, not 0"):
        Recipe(expert_min_tokens=0)
    result = api.quantize(_model("olmoe"), Recipe(group_size=16), progress=False)  # RTN, no calibration
    experts = [n for n in result.plan if ".mlp.experts." in n]
    assert len(experts) == 2 * 16 * 3  # two blocks of 16 experts, gate/up/down each: all counted in the sizes
    layers = [result.model.get_submodule(n) for n in result.plan]
    assert result.sizes["quantized_weights"] == sum(m.in_features * m.out_features for m in layers)
    with pytest.raises(LowbitError, match=r"compressed-tensors export of the moe family .*Save a lowbit checkpoint"):
        export(result, "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
