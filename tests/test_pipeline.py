"""The block-by-block driver: hand-off between blocks, equivalence with whole-model RTN, calibration, families."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM, OPTConfig

import lowbit
from lowbit import api
from lowbit.data.calibration import CalibConfig, calibration_ids
from lowbit.errors import LowbitError
from lowbit.formats import fake_quantize
from lowbit.model.architectures import decoder_blocks
from lowbit.model.loading import family_of
from lowbit.recipe import Recipe
from lowbit.runtime import QuantLinear

CALIB = CalibConfig(dataset="c4", samples=6, seqlen=96, seed=3)


def test_block_by_block_equals_whole_model_rtn(stories, _stories):
    recipe = Recipe(scheme="w3a16", group_size=4, symmetric=False)
    result = api.quantize(stories, recipe, progress=False)
    reference = dict(_stories.named_modules())
    for name, module in result.model.named_modules():
        if isinstance(module, QuantLinear):
            expected = fake_quantize(reference[name].weight, result.plan[name].weight)
            assert torch.equal(module.dequantized_weight(), expected), name
    assert len(result.plan) == 35


def test_block_hand_off_matches_the_fake_quantized_model(stories, _stories, stories_tokenizer):
    """The inputs handed from block to block equal what the whole fake-quantized model computes (same device)."""
    result = api.quantize(stories, Recipe(scheme="w4a16", group_size=0), tokenizer=stories_tokenizer, calib=CALIB,
                          device="cpu", compute_dtype="float32", progress=False)
    fake = api.fake_quantize_model(_stories, result.plan, result.dtype)
    ids = calibration_ids(stories_tokenizer, CALIB)
    seen = []
    handle = decoder_blocks(fake, family_of(fake))[-1].register_forward_hook(
        lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        for batch in ids.split(8):
            fake(batch)
    handle.remove()
    handed = torch.cat(result.pipeline.final_inputs.hidden)
    assert handed.shape == (CALIB.samples, CALIB.seqlen, 64)
    torch.testing.assert_close(handed, torch.cat(seen), rtol=1e-6, atol=1e-6)
    errors = [b.output_error for b in result.pipeline.blocks]
    assert all(0 < e < 1 for e in errors)


def test_block_errors_shrink_with_more_bits(stories, _stories, stories_tokenizer):
    import copy

    e8 = api.quantize(stories, Recipe(scheme="w8a16", group_size=0), tokenizer=stories_tokenizer, calib=CALIB,
                      progress=False).pipeline.blocks
    e3 = api.quantize(copy.deepcopy(_stories), Recipe(scheme="w3a16", group_size=0), tokenizer=stories_tokenizer,
                      calib=CALIB, progress=False).pipeline.blocks
    assert all(a.output_error < b.output_error / 10 for a, b in zip(e8, e3, strict=True))


def test_calibration_windows_are_deterministic_and_distinct(stories_tokenizer):
    a, b = calibration_ids(stories_tokenizer, CALIB), calibration_ids(stories_tokenizer, CALIB)
    assert torch.equal(a, b) and a.shape == (6, 96)
    assert len({tuple(r) for r in a.tolist()}) == 6
    other = calibration_ids(stories_tokenizer, CalibConfig("c4", 6, 96, seed=4))
    assert not torch.equal(a, other)


def test_calibration_smaller_than_requested(stories_tokenizer):
    with pytest.raises(LowbitError, match="calibration set smaller than requested"):
        calibration_ids(stories_tokenizer, CalibConfig("c4", samples=100_000, seqlen=512))


def test_calibration_seqlen_capped_at_context(stories_tokenizer):
    ids = calibration_ids(stories_tokenizer, CalibConfig("c4", samples=2, seqlen=4096), max_seqlen=512)
    assert ids.shape == (2, 512)


def test_calibration_from_a_text_file(tmp_path, stories_tokenizer):
    path = tmp_path / "calib.txt"
    path.write_text("Once upon a time there was a cat. " * 200)
    assert calibration_ids(stories_tokenizer, CalibConfig(str(path), samples=3, seqlen=64)).shape == (3, 64)
    with pytest.raises(LowbitError, match="unknown calibration set"):
        calibration_ids(stories_tokenizer, CalibConfig("no-such-set", samples=3, seqlen=64))


def _tiny_opt():
    config = OPTConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                       max_position_embeddings=128, word_embed_proj_dim=32)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_opt_family_is_a_table_entry(stories_tokenizer, tmp_path):
    """OPT differs in paths only (decoder.layers, fc1/fc2, learned positions); the same driver handles it."""
    model = _tiny_opt()
    reference = __import__("copy").deepcopy(model)
    result = api.quantize(model, Recipe(scheme="w4a16", group_size=16), tokenizer=stories_tokenizer,
                          calib=CalibConfig("c4", 4, 64), progress=False)
    kinds = {n.rsplit(".", 1)[-1] for n in result.plan}
    assert kinds == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"} and len(result.plan) == 12
    fake = api.fake_quantize_model(reference, result.plan, result.dtype)
    ids = torch.randint(0, 512, (2, 20))
    torch.testing.assert_close(result.model(ids).logits, fake(ids).logits, rtol=1e-5, atol=1e-5)
    api.save(result, tmp_path / "opt")  # OPT's linear layers have biases: they round-trip in 16 bits
    loaded = lowbit.load(tmp_path / "opt")
    assert loaded.model.decoder.layers[0].fc1.bias is not None
    assert torch.equal(loaded(ids).logits, result.model(ids).logits)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "b")
    with pytest.raises(LowbitError, match=r"architecture 'bloom' is not supported.*gemma3.*gpt2.*llama.*mixtral.*opt"):
        lowbit.load(tmp_path / "b")


def test_device_resolution():
    assert api.resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(LowbitError, match="unknown device"):
        api.resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(LowbitError, match="no CUDA GPU"):
            api.resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_gpu_pipeline_matches_cpu(_stories, stories_tokenizer):
    import copy

    recipe = Recipe(scheme="w4a16", group_size=4, symmetric=False)
    cpu = api.quantize(copy.deepcopy(_stories), recipe, tokenizer=stories_tokenizer, calib=CALIB, device="cpu",
                       compute_dtype="float32", progress=False)
    gpu = api.quantize(copy.deepcopy(_stories), recipe, tokenizer=stories_tokenizer, calib=CALIB, device="cuda",
                       compute_dtype="float32", progress=False)
    assert all(p.device.type == "cpu" for p in gpu.model.parameters())  # blocks go back after their turn
    cpu_layers, gpu_layers = dict(cpu.model.named_modules()), dict(gpu.model.named_modules())
    for name in cpu.plan:
        a, b = cpu_layers[name].quantized_weight(), gpu_layers[name].quantized_weight()
        assert (a.codes != b.codes).float().mean() < 1e-3, name  # a rounding tie may land differently
        torch.testing.assert_close(a.scale, b.scale, rtol=1e-3, atol=0)
    for a, b in zip(cpu.pipeline.blocks, gpu.pipeline.blocks, strict=True):
        assert b.output_error == pytest.approx(a.output_error, rel=1e-2)


def test_gptq_through_the_pipeline_beats_rtn(_stories, stories_tokenizer, tmp_path):
    """True-sequential GPTQ on the real tiny model: lower block output error than RTN on the same data,
    and the checkpoint reloads to the same logits."""
    import copy

    calib = CalibConfig("c4", samples=8, seqlen=128, seed=1)
    recipe = Recipe(method="gptq", scheme="w3a16", group_size=0)
    gptq = api.quantize(copy.deepcopy(_stories), recipe, tokenizer=stories_tokenizer, calib=calib, device="cpu",
                        progress=False)
    rtn = api.quantize(copy.deepcopy(_stories), Recipe(scheme="w3a16", group_size=0), tokenizer=stories_tokenizer,
                       calib=calib, device="cpu", progress=False)
    g = [b.output_error for b in gptq.pipeline.blocks]
    r = [b.output_error for b in rtn.pipeline.blocks]
    assert sum(g) < 0.8 * sum(r), (g, r)
    api.save(gptq, tmp_path / "g")
    ids = torch.randint(3, 512, (1, 40))
    assert torch.equal(lowbit.load(tmp_path / "g")(ids).logits, gptq.model(ids).logits)


def test_sequential_groups_follow_the_data_flow():
    from lowbit.pipeline import sequential_groups

    order = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
             ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
    names = ["mlp.down_proj", "self_attn.k_proj", "self_attn.o_proj", "extra.proj"]
    assert sequential_groups(order, names) == [["self_attn.k_proj"], ["self_attn.o_proj"], ["mlp.down_proj"],
                                               ["extra.proj"]]


def test_shared_statistics_and_early_exit_change_no_result(_stories, stories_tokenizer, monkeypatch):
    """q/k/v (and gate/up) share one Hessian and are quantized stacked; statistics passes stop once the group's
    layers have their inputs. Both are speed-ups only: the result equals one layer at a time with full passes."""
    import copy

    from lowbit import pipeline
    from lowbit.methods import gptq
    from lowbit.model.capture import capture_block_inputs

    block = decoder_blocks(_stories, family_of(_stories))[0]
    ids = calibration_ids(stories_tokenizer, CALIB)
    inputs = capture_block_inputs(_stories, family_of(_stories), ids, "cpu")
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    gs = pipeline._collect_stats(block, names, gptq, inputs, "cpu", "cpu")  # no batch runs to the end
    assert gs.shared() == {"self_attn.q_proj": names} and gs.outputs is None
    assert gs.stats["self_attn.q_proj"].n == inputs.tokens

    recipe = Recipe(method="gptq", scheme="w4a16", group_size=4, symmetric=False)
    fast = api.quantize(copy.deepcopy(_stories), recipe, tokenizer=stories_tokenizer, calib=CALIB, device="cpu",
                        progress=False)
    collect = pipeline._collect_stats
    everything = len(inputs.hidden)
    monkeypatch.setattr(pipeline, "_collect_stats", lambda *a, **k: collect(*a[:6], **{**k, "full": everything}))
    monkeypatch.delattr(gptq, "quantize_shared")
    slow = api.quantize(copy.deepcopy(_stories), recipe, tokenizer=stories_tokenizer, calib=CALIB, device="cpu",
                        progress=False)
    for name, layer in fast.model.named_modules():
        if isinstance(layer, QuantLinear):
            a = layer.dequantized_weight()
            b = slow.model.get_submodule(name).dequantized_weight()
            assert (a != b).float().mean() < 1e-3, name  # stacked rows: float sums may round a tie differently


def test_residual_shortcut_equals_a_final_pass(_stories, stories_tokenizer, monkeypatch):
    """The last layer deferred (block output = partial output + down_q(x)) hands the next block what a final pass
    over the quantized block computes, and the attention replayed in the MLP's passes (o_proj's output from its
    recorded inputs) changes no statistic: the weights are those of full passes."""
    import copy
    import functools

    from lowbit import pipeline

    recipe = Recipe(method="gptq", scheme="w4a16", group_size=4)

    def run():
        return api.quantize(copy.deepcopy(_stories), recipe, tokenizer=stories_tokenizer, calib=CALIB, device="cpu",
                            compute_dtype="float32", progress=False)

    fast = run()
    monkeypatch.setattr(api, "quantize_model", functools.partial(pipeline.quantize_model, shortcut=False))
    off = run()
    assert all(b.shortcut and b.replay for b in fast.pipeline.blocks)
    assert not any(b.shortcut or b.replay for b in off.pipeline.blocks)
    for a, b in zip(fast.pipeline.final_inputs.hidden, off.pipeline.final_inputs.hidden, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name in fast.plan:
        assert torch.equal(fast.model.get_submodule(name).dequantized_weight(),
                           off.model.get_submodule(name).dequantized_weight()), name
    assert [b.output_error for b in fast.pipeline.blocks] == pytest.approx(
        [b.output_error for b in off.pipeline.blocks], rel=1e-4)


def test_shortcut_falls_back_where_the_block_is_not_a_residual_sum(_stories, stories_tokenizer):
    """With only o_proj planned, the deferred layer's output feeds the MLP: the shortcut is refused after the
    check on the first batch, and the hand-off still equals the fake-quantized model's."""
    import copy

    recipe = Recipe(method="gptq", scheme="w4a16", group_size=4, targets=(r"self_attn\.(q|o)_proj",))
    result = api.quantize(copy.deepcopy(_stories), recipe, tokenizer=stories_tokenizer, calib=CALIB, device="cpu",
                          compute_dtype="float32", progress=False)
    assert not any(b.shortcut for b in result.pipeline.blocks)
    fake = api.fake_quantize_model(_stories, {}, result.dtype)
    for name in result.plan:
        fake.get_submodule(name).weight.data = result.model.get_submodule(name).dequantized_weight()
    seen = []
    handle = decoder_blocks(fake, family_of(fake))[-1].register_forward_hook(
        lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        for batch in calibration_ids(stories_tokenizer, CALIB).split(8):
            fake(batch)
    handle.remove()
    torch.testing.assert_close(torch.cat(result.pipeline.final_inputs.hidden), torch.cat(seen), rtol=1e-5,
                               atol=1e-5)


def test_bf16_calibration_keeps_float32_weights_and_tracks_float32(_stories, stories_tokenizer):
    """Calibration passes in bfloat16: unquantized parameters come back in float32, bit-equal; layers are
    quantized from the float32 originals; the block errors stay close to a float32 run's."""
    import copy

    recipe = Recipe(method="gptq", scheme="w4a16", group_size=4)
    runs = {dt: api.quantize(copy.deepcopy(_stories), recipe, tokenizer=stories_tokenizer, calib=CALIB,
                             device="cpu", compute_dtype=dt, progress=False) for dt in ("bfloat16", "float32")}
    bf16 = runs["bfloat16"]
    rounded = api.fake_quantize_model(_stories, {}, bf16.dtype)
    for n, p in bf16.model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, rounded.get_parameter(n)), n
    assert bf16.pipeline.final_inputs.hidden[0].dtype == torch.bfloat16
    a = torch.tensor([b.output_error for b in bf16.pipeline.blocks])
    b = torch.tensor([b.output_error for b in runs["float32"].pipeline.blocks])
    assert ((a - b).abs() / b).max() < 0.25, (a, b)
    with pytest.raises(LowbitError, match="unknown --compute-dtype"):
        api.quantize(copy.deepcopy(_stories), recipe, tokenizer=stories_tokenizer, calib=CALIB, device="cpu",
                     compute_dtype="int8", progress=False)
