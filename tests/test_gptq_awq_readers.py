"""GPTQ-format and AWQ-format checkpoints read into lowbit's runtime.

The directories are written here by reference packers that follow AutoGPTQ's `QuantLinear.pack` loop (codes along
the input dimension, zeros minus one in the original format) and AutoAWQ's GEMM `pack` loop (eight codes per word
along the output dimension in the order 0, 2, 4, 6, 1, 3, 5, 7), from a lowbit quantization of stories260K; lowbit
must read back exactly the weights it wrote.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import lowbit
from lowbit import api
from lowbit.errors import LowbitError
from lowbit.io.checkpoint import quantized_layers
from lowbit.recipe import Recipe

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _pack_gptq_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's loop for 2/4/8 bits: rows of `values` [n, cols] packed 32/bits to a word, lowest bits first."""
    per = 32 // bits
    out = torch.zeros(values.shape[0] // per, values.shape[1], dtype=torch.int64)
    for row in range(out.shape[0]):
        for j in range(per):
            out[row] |= values[row * per + j].to(torch.int64) << (bits * j)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def _pack_awq(values: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's GEMM loop: [rows, cols] 4-bit values → [rows, cols/8], nibble i = column ORDER[i] of each eight."""
    out = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for col in range(out.shape[1]):
        for i, k in enumerate(AWQ_ORDER):
            out[:, col] |= values[:, col * 8 + k].to(torch.int64) << (4 * i)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


@pytest.fixture(scope="module")
def source(tmp_path_factory, stories_path):
    """A lowbit asymmetric w4 g16 quantization of stories260K's attention layers (the MLP's 172 channels are not
    a multiple of the 8 codes a word holds, which both layouts need)."""
    recipe = Recipe(scheme="w4a16", group_size=16, symmetric=False, targets=(r"self_attn",))
    result = api.quantize(stories_path, recipe, progress=False)
    ckpt = tmp_path_factory.mktemp("src") / "lowbit"
    api.save(result, ckpt, tokenizer=lowbit.load_tokenizer(stories_path))
    return ckpt


def _write(directory, ckpt, layers: dict[str, dict[str, torch.Tensor]], qconfig: dict):
    directory.mkdir()
    model = lowbit.load(ckpt)
    qnames = quantized_layers(model)
    tensors = {k: v.to(torch.float16) for k, v in model.state_dict().items()
               if not any(k.startswith(n + ".") for n in qnames)}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    for name, t in layers.items():
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in t.items()})
    save_file(tensors, str(directory / "model.safetensors"))
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = qconfig
    (directory / "config.json").write_text(json.dumps(config))
    for f in ckpt.iterdir():
        if f.name.startswith("tokenizer"):
            (directory / f.name).write_bytes(f.read_bytes())
    return directory


def _gptq_layers(ckpt, version: str, permute: bool = False):
    gen = torch.Generator().manual_seed(0)
    out, expected = {}, {}
    for name, m in quantized_layers(lowbit.load(ckpt)).items():
        qw = m.quantized_weight()
        codes, scale, zero = qw.codes, qw.scale, qw.zero  # [out, in], [out, groups]
        groups = scale.shape[1]
        g_idx = torch.arange(codes.shape[1]) // (codes.shape[1] // groups)
        if permute:  # act-order: columns belong to groups in a shuffled order, as GPTQ's desc_act leaves them
            g_idx = g_idx[torch.randperm(codes.shape[1], generator=gen)]
        expected[name] = (codes.float() - zero.float()[:, g_idx]) * scale.float()[:, g_idx]
        qzeros = _pack_gptq_rows(zero, 4).t()
        if version == "gptq":  # GPTQModel's v1: the packed words minus 0x11111111, borrows included
            q = (qzeros.to(torch.int64) - 0x11111111) & 0xFFFFFFFF
            qzeros = torch.where(q >= 2**31, q - 2**32, q).to(torch.int32)
        out[name] = {"qweight": _pack_gptq_rows(codes.t(), 4), "qzeros": qzeros,
                     "scales": scale.t().to(torch.float16), "g_idx": g_idx.to(torch.int32)}
    return out, expected


@pytest.mark.parametrize(("version", "permute"), [("gptq", False), ("gptq_v2", False), ("gptq", True)])
def test_gptq_format(version, permute, source, tmp_path, story_ids):
    layers, expected = _gptq_layers(source, version, permute)
    qconfig = {"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": permute, "sym": False,
               "checkpoint_format": version}
    model = lowbit.load(_write(tmp_path / "gptq", source, layers, qconfig))
    for name, m in quantized_layers(model).items():
        assert torch.equal(m.dequantized_weight(), expected[name]), name
        assert m.spec.weight.g_idx == permute
    if not permute:  # (the source has a zero point of 0: v1's borrow is exercised)
        with torch.no_grad():
            assert torch.equal(model(story_ids).logits, lowbit.load(source)(story_ids).logits)


def test_awq_format(source, tmp_path, story_ids):
    layers = {}
    for name, m in quantized_layers(lowbit.load(source)).items():
        qw = m.quantized_weight()
        layers[name] = {"qweight": _pack_awq(qw.codes.t()), "qzeros": _pack_awq(qw.zero.t()),
                        "scales": qw.scale.t().to(torch.float16)}
    qconfig = {"quant_method": "awq", "bits": 4, "group_size": 16, "zero_point": True, "version": "gemm"}
    model = lowbit.load(_write(tmp_path / "awq", source, layers, qconfig))
    with torch.no_grad():
        assert torch.equal(model(story_ids).logits, lowbit.load(source)(story_ids).logits)
    qconfig["version"] = "gemv"
    (tmp_path / "awq" / "config.json").write_text(json.dumps(
        {**json.loads((tmp_path / "awq" / "config.json").read_text()), "quantization_config": qconfig}))
    with pytest.raises(LowbitError, match="GEMM layout"):
        lowbit.load(tmp_path / "awq")


def test_act_order_layers_survive_a_lowbit_checkpoint(source, tmp_path, story_ids):
    layers, _ = _gptq_layers(source, "gptq_v2", permute=True)
    qconfig = {"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": True, "sym": False,
               "checkpoint_format": "gptq_v2"}
    model = lowbit.load(_write(tmp_path / "gptq", source, layers, qconfig))
    from lowbit.io.checkpoint import save_checkpoint
    from lowbit.io.compressed_tensors import UnsupportedExport

    save_checkpoint(model, tmp_path / "again", dtype=torch.float16)
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "again")(story_ids).logits, model(story_ids).logits)
    with pytest.raises(UnsupportedExport, match="g_idx"):
        lowbit.export(tmp_path / "again", "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
