"""llama.cpp's k-quants (Q2_K … Q6_K) and IQ4_NL: lowbit's weights written as ggml bytes are read back by the `gguf`
package (llama.cpp's own Python library) to exactly lowbit's dequantized values, and by lowbit to the same codes and
statistics; round to nearest, importance weighting and GPTQ on these grids; llama.cpp's mixes and fallbacks."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import KQuantFormat, KQuantWeight, from_packed, packed_shapes, quantize
from lowbit.formats.ggml_mix import fitted_type, mix_type, more_bits
from lowbit.formats.kquant import KTYPES, from_blocks_k, quantize_k, to_blocks_k
from lowbit.recipe import Recipe, scheme_spec

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

QTYPE = {name: getattr(gguf.GGMLQuantizationType, name.upper()) for name in KTYPES}


def _weights(seed: int, rows: int = 8, cols: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02 + torch.randn(rows, 1, generator=g) * 0.01
    w[0, :256] = 0.0  # an all-zero super-block
    w[1, 5] = 0.5  # an outlier
    w[2, 256:] = -w[2, 256:].abs()  # a super-block with no positive weight
    w[3, :32] = 0.01  # a constant sub-block
    return w


@pytest.mark.parametrize("name", list(KTYPES))
def test_k_blocks_dequantize_in_gguf_to_lowbit_values(name):
    fmt = KQuantFormat(name)
    qw = quantize(_weights(KTYPES[name].bits), fmt)
    assert isinstance(qw, KQuantWeight)
    blocks = to_blocks_k(qw)
    assert blocks.dtype == np.uint8 and blocks.shape == (8, 512 // fmt.superblock * KTYPES[name].block_bytes)
    ours = qw.dequantize().numpy()
    assert np.array_equal(gguf_dequantize(blocks, QTYPE[name]), ours)  # bit for bit, every block
    back = from_blocks_k(blocks, name, (8, 512))
    assert torch.equal(back.codes, qw.codes) and back.stats.keys() == qw.stats.keys()
    assert all(torch.equal(back.stats[k], qw.stats[k]) for k in qw.stats)
    assert np.array_equal(ours[0, :256], np.zeros(256, dtype=np.float32))  # zeros stay exact zeros
    # the lowbit checkpoint's tensors hold the same weight
    packed = qw.packed()
    assert {k: (tuple(v.shape), v.dtype) for k, v in packed.items()} == packed_shapes(fmt, (8, 512))
    assert torch.equal(from_packed(fmt, (8, 512), packed).dequantize(), qw.dequantize())


def test_more_bits_give_smaller_errors_and_the_gguf_sizes():
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0)) * 0.02
    errors = {}
    for name in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k"):
        qw = quantize(w, KQuantFormat(name))
        errors[name] = float((qw.dequantize() - w).norm() / w.norm())
        assert to_blocks_k(qw).nbytes * 8 / w.numel() == KTYPES[name].bits_per_weight
    ordered = list(errors.values())
    assert all(a > 1.6 * b for a, b in itertools.pairwise(ordered)), errors
    # each extra bit roughly halves the error, as a uniform grid's step: q4_k within the range of 4-bit RTN
    assert 0.04 < errors["q4_k"] < 0.09, errors


def test_importance_lowers_the_weighted_error():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 512, generator=g) * 0.02
    imp = torch.rand(512, generator=g) ** 4 * 10  # a few columns matter much more
    for name in ("q3_k", "q4_k", "iq4_nl"):
        plain, weighted = quantize_k(w, KQuantFormat(name)), quantize_k(w, KQuantFormat(name), imp)
        err = [float(((q.dequantize() - w) ** 2 * imp).sum()) for q in (plain, weighted)]
        assert err[1] < 0.9 * err[0], (name, err)


def test_gptq_on_a_k_grid_lowers_the_output_error():
    from lowbit.methods.gptq import accumulate, gptq_quantize, init_stats

    g = torch.Generator().manual_seed(2)
    mix = torch.randn(512, 512, generator=g) * 0.3 + torch.eye(512)  # correlated inputs, as a layer sees
    x = torch.randn(2048, 512, generator=g) @ mix
    w = torch.randn(48, 512, generator=g) * 0.02
    stats = accumulate(init_stats(512), x)
    for name in ("q4_k", "q6_k", "iq4_nl"):
        fmt = KQuantFormat(name)
        rtn, gptq = quantize(w, fmt), gptq_quantize(w, stats, fmt)
        assert isinstance(gptq, KQuantWeight) and gptq.stats.keys() == rtn.stats.keys()
        err = [float(((q.dequantize() - w) @ x.T).norm()) for q in (rtn, gptq)]
        assert err[1] < 0.85 * err[0], (name, err)
        assert np.array_equal(gguf_dequantize(to_blocks_k(gptq), QTYPE[name]), gptq.dequantize().numpy())
        # the first super-block, reached before any update, is fitted as imatrix would with diag(H) as importance
        sb = fmt.superblock
        first = quantize_k(w[:, :sb], fmt, torch.diag(stats.H)[:sb])
        for key, v in first.stats.items():
            assert torch.equal(gptq.stats[key][:, :v.shape[1]], v), (name, key)
    with pytest.raises(LowbitError, match="act-order"):
        from lowbit.methods.gptq import GPTQConfig

        gptq_quantize(w, stats, KQuantFormat("q4_k"), GPTQConfig(act_order=True))


def test_schemes_refuse_options_the_types_fix():
    assert scheme_spec("Q4_K", None, True, False).weight == KQuantFormat("q4_k")
    assert scheme_spec("q4_k_m", None, True, False).weight == KQuantFormat("q4_k")  # a mix's base type
    for bad in (dict(group_size=64), dict(symmetric=False), dict(clip=True)):
        args = {"group_size": None, "symmetric": True, "clip": False, **bad}
        with pytest.raises(LowbitError, match="fixes its blocks"):
            scheme_spec("q5_k", args["group_size"], args["symmetric"], args["clip"])
    with pytest.raises(LowbitError, match="not a whole number"):
        quantize(torch.zeros(4, 576), KQuantFormat("q4_k"))
    with pytest.raises(LowbitError, match=r"unknown llama\.cpp type"):
        KQuantFormat("q7_k")


def test_mixes_follow_llama_cpp():
    n = 32
    assert [i for i in range(n) if more_bits(i, n)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert mix_type("q4_k_m", "model.layers.0.self_attn.v_proj", 0, n) == "q6_k"
    assert mix_type("q4_k_m", "model.layers.4.self_attn.v_proj", 4, n) == "q4_k"
    assert mix_type("q4_k_m", "model.layers.6.mlp.down_proj", 6, n) == "q6_k"
    assert mix_type("q4_k_m", "model.layers.6.mlp.up_proj", 6, n) == "q4_k"
    assert mix_type("q5_k_m", "model.layers.31.mlp.down_proj", 31, n) == "q6_k"
    assert mix_type("q3_k_m", "model.layers.1.self_attn.v_proj", 1, n) == "q5_k"
    assert mix_type("q3_k_m", "model.layers.2.self_attn.v_proj", 2, n) == "q4_k"
    assert mix_type("q3_k_m", "model.layers.1.mlp.down_proj", 1, n) == "q5_k"
    assert mix_type("q3_k_m", "model.layers.2.mlp.down_proj", 2, n) == "q4_k"
    assert mix_type("q3_k_m", "model.layers.9.self_attn.o_proj", 9, n) == "q4_k"
    assert mix_type("q3_k_m", "model.layers.9.self_attn.q_proj", 9, n) == "q3_k"
    # rows that are not whole super-blocks: llama.cpp's fallbacks, 16 bits when not even blocks of 32
    assert [fitted_type(t, 576) for t in ("q4_k", "q5_k", "q6_k", "q3_k", "q2_k")] == \
        ["q5_0", "q5_1", "q8_0", "iq4_nl", "iq4_nl"]
    assert fitted_type("q4_k", 1536) == "q4_k" and fitted_type("q6_k", 172) is None


def test_mix_plan_on_a_real_model(stories, caplog):
    """stories260K's rows (64 and 172 columns) are no super-blocks: every layer takes llama.cpp's fallback, said
    once per kind, and the rows of 172 stay in 16 bits."""
    from lowbit.model.architectures import family_for
    from lowbit.model.targets import select_layers

    with caplog.at_level(logging.WARNING, logger="lowbit"):
        plan = select_layers(stories, family_for(stories.config.model_type), Recipe(scheme="q4_k_m"))
    kinds = {n.rsplit(".", 1)[-1]: s.weight for n, s in plan.items()}
    assert "down_proj" not in kinds  # 172 columns
    assert kinds["q_proj"].bits == 5 and kinds["q_proj"].float_zero is False  # Q4_K → Q5_0
    v = {s.weight.bits for n, s in plan.items() if n.endswith("v_proj")}
    assert v == {8, 5}  # Q6_K → Q8_0 where more bits, else Q4_K → Q5_0
    assert "Q4_K → Q5_0" in caplog.text and "16 bits" in caplog.text


@pytest.mark.slow
def test_llama_cpp_runs_lowbits_k_quant_gguf(tmp_path, llama_logits):
    """lowbit's Q4_K_M GGUF of SmolLM2-135M (Q4_K where rows are 1536 long, llama.cpp's fallbacks Q5_0/Q8_0 on
    rows of 576, Q6_K on the mix's ffn_down layers): transformers' GGUF reader gets exactly lowbit's weights, and
    llama.cpp's logits on a fixed prompt match lowbit's model about as closely as llama.cpp's own logits on the
    source GGUF match that file's float dequantization (llama.cpp's CPU path rounds activations to 8 bits for
    quantized weights; see test_ggml's q4_0 test)."""
    import lowbit
    from lowbit import api
    from lowbit.io.export import export
    from lowbit.model.builtin import builtin_gguf
    from lowbit.model.loading import load_float, load_gguf
    from lowbit.model.sources import resolve
    from lowbit.runtime.qlinear import QuantLinear

    result = api.quantize("smollm2-135m", Recipe(method="rtn", scheme="q4_k_m"), progress=False)
    out = tmp_path / "q4_k_m.gguf"
    export(result, "gguf", out)
    types = {t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert {gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K, gguf.GGMLQuantizationType.Q5_0,
            gguf.GGMLQuantizationType.Q8_0} <= types
    theirs = load_gguf(out)
    for name, module in result.model.named_modules():
        if isinstance(module, QuantLinear):
            assert torch.equal(theirs.get_submodule(name).weight.float(), module.dequantized_weight()), name

    ids = lowbit.load_tokenizer("smollm2-135m")("The capital of France is Paris. The capital of Germany is",
                                                 return_tensors="pt").input_ids

    def rel(a, b) -> float:
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    with torch.no_grad():
        ours = result.model(ids).logits[0].float().numpy()
        float_ref = load_float(resolve("smollm2-135m"))(ids).logits[0].float().numpy()
    llama_ours, llama_src = llama_logits(out, ids), llama_logits(builtin_gguf("smollm2-135m"), ids)
    assert rel(llama_ours, ours) <= 1.5 * rel(llama_src, float_ref) + 0.01
    assert rel(llama_ours, ours) < 0.5 * rel(ours, float_ref)
    assert (llama_ours.argmax(-1) == ours.argmax(-1)).mean() >= 0.75
