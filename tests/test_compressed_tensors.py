"""compressed-tensors export and import: what transformers and the compressed-tensors library make of lowbit's
exports, what lowbit reads back, and the refusals (stories260K here; SmolLM2-135M in test_smollm_export.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

import lowbit
from lowbit import api, cli
from lowbit.data.calibration import CalibConfig
from lowbit.errors import LowbitError
from lowbit.io.checkpoint import quantized_layers
from lowbit.io.compressed_tensors import UnsupportedExport, _matches
from lowbit.recipe import Override, Recipe

CALIB = CalibConfig("c4", 8, 128)
G = 4  # stories260K: hidden 64, intermediate 172; groups of 4 divide both

CASES = {
    "w4a16-g-sym-full": Recipe(scheme="w4a16", group_size=G),
    "w4a16-g-restricted": Recipe(scheme="w4a16", group_size=G, full_range=False),
    "w4a16-g-asym": Recipe(scheme="w4a16", group_size=G, symmetric=False),
    "w4a16-channel": Recipe(scheme="w4a16", group_size=0),
    "w4a16-gptq-act-order": Recipe(method="gptq", scheme="w4a16", group_size=G, options={"act_order": True}),
    "w8a16": Recipe(scheme="w8a16"),
    "w8a8-dynamic": Recipe(scheme="w8a8"),
    "w8a8-static": Recipe.preset("smoothquant-o3"),
    "fp8": Recipe(method="fp8", scheme="fp8"),
    "awq": Recipe(method="awq", scheme="w4a16", group_size=G),
    "smoothquant": Recipe.preset("smoothquant-o1"),
    "mixed": Recipe(scheme="w4a16", group_size=G, overrides=(Override(r"mlp\.down_proj", scheme="w8a16"),
                                                             Override(r"layers\.4\.mlp", skip=True))),
    "kv-fp8-static": Recipe(method="fp8", scheme="fp8", kv_cache="fp8", kv_static=True),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, stories_path):
    """case -> (lowbit checkpoint, compressed-tensors export), made once per case on first use."""
    made = {}
    tokenizer = lowbit.load_tokenizer(stories_path)

    def get(case: str):
        if case not in made:
            root = tmp_path_factory.mktemp(case)
            recipe = CASES[case]
            result = api.quantize(stories_path, recipe, tokenizer=tokenizer, calib=CALIB, progress=False)
            api.save(result, root / "lowbit", tokenizer=tokenizer)
            lowbit.export(root / "lowbit", "compressed-tensors", root / "ct")
            made[case] = (root / "lowbit", root / "ct")
        return made[case]

    return get


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _transformers(ct_dir, **kw):
    return AutoModelForCausalLM.from_pretrained(ct_dir, dtype=torch.float32, **kw).eval()


DYNAMIC_INT8 = ("w8a8-dynamic", "smoothquant")


@pytest.mark.parametrize("case", sorted(set(CASES) - {"w4a16-g-asym", "kv-fp8-static", *DYNAMIC_INT8}))
def test_transformers_loads_the_export_with_lowbits_logits(case, exported, story_ids):
    ckpt, ct = exported(case)
    want = _logits(lowbit.load(ckpt), story_ids)
    assert _rel(_logits(_transformers(ct), story_ids), want) < 1e-4


def test_asymmetric_export_in_transformers(exported, story_ids):
    """transformers 5.x cannot build packed asymmetric zero points on its meta model (a known compressed-tensors
    limitation: the zero point is not packed before loading), so it is loaded with dequantize=True, which reads the
    same tensors through the same decompression, in the scales' dtype (float16): both models run in float16."""
    ckpt, ct = exported("w4a16-g-asym")
    want = _logits(lowbit.load(ckpt, dtype=torch.float16), story_ids).float()
    model = AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float16,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    assert _rel(_logits(model, story_ids).float(), want) < 1e-4


@pytest.mark.parametrize("case", DYNAMIC_INT8)
def test_dynamic_int8_activations_in_transformers(case, exported, story_ids):
    """Weights agree exactly. Dynamic per-token int8 scales differ by convention: lowbit uses amax / 127 (vLLM's
    kernel, the SmoothQuant paper), compressed-tensors' emulation in transformers amax / 127.5."""
    ckpt, ct = exported(case)
    theirs = _transformers(ct)
    ours = lowbit.load(ckpt)
    assert _rel(_logits(theirs, story_ids), _logits(ours, story_ids)) < 2e-2
    for name, m in quantized_layers(ours).items():
        assert torch.equal(theirs.get_submodule(name).weight, m.dequantized_weight()), name


def test_kv_cache_scales_are_exported_and_read_back(exported, story_ids):
    """transformers 5.x ignores kv_cache_scheme (its attention takes no past_key_values compressed-tensors can
    hook), so its logits are those of the model with a 16-bit cache; lowbit reads the static scales back."""
    ckpt, ct = exported("kv-fp8-static")
    config = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert config["kv_cache_scheme"] == {**config["kv_cache_scheme"], "num_bits": 8, "type": "float",
                                         "strategy": "tensor", "dynamic": False}
    tensors = load_file(str(ct / "model.safetensors"))
    ours = lowbit.load(ckpt)
    for i, block in enumerate(ours.model.layers):
        assert tensors[f"model.layers.{i}.self_attn.k_scale"].item() == block.self_attn.k_scale.item()
        assert tensors[f"model.layers.{i}.self_attn.v_scale"].item() == block.self_attn.v_scale.item()
    plain = lowbit.load(ckpt)
    plain._forward_pre_hooks.clear()  # the hook that hands the model a quantized cache
    assert _rel(_logits(_transformers(ct), story_ids), _logits(plain, story_ids)) < 1e-4
    assert not torch.equal(_logits(plain, story_ids), _logits(ours, story_ids))


@pytest.mark.parametrize("case", sorted(CASES))
def test_library_decompression_gives_lowbits_weights(case, exported):
    ckpt, ct = exported(case)
    qconfig = json.loads((ct / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate({k: v for k, v in qconfig.items() if k != "version"})
    tensors = load_file(str(ct / "model.safetensors"))
    layers = quantized_layers(lowbit.load(ckpt))
    assert set(config.ignore) == ({"lm_head"} | ({f"model.layers.4.mlp.{n}" for n in ("gate_proj", "up_proj",
                                                                                      "down_proj")}
                                                 if case == "mixed" else set()))
    for name, m in layers.items():
        scheme = [s for s in config.config_groups.values() if _matches(name, s.targets)][-1]
        local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        want = m.dequantized_weight()
        exact = compressor.decompress({**local, "weight_scale": local["weight_scale"].float()}, scheme)["weight"]
        assert exact.dtype == torch.float32 and torch.equal(exact, want), name
        stored = compressor.decompress(local, scheme)["weight"]  # in the stored scale's dtype
        assert torch.equal(stored, want.to(stored.dtype)), name


@pytest.mark.parametrize("case", sorted(CASES))
def test_lowbit_reads_the_export_back(case, exported, story_ids):
    ckpt, ct = exported(case)
    back = lowbit.load(ct)
    assert torch.equal(_logits(back, story_ids), _logits(lowbit.load(ckpt), story_ids))
    assert {n: m.spec.act for n, m in quantized_layers(back).items()} == \
        {n: m.spec.act for n, m in quantized_layers(lowbit.load(ckpt)).items()}


def test_config_names_the_schemes(exported):
    _, ct = exported("mixed")
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quantization_status"] == "compressed"
    bits = sorted(g["weights"]["num_bits"] for g in qc["config_groups"].values())
    assert bits == [4, 8]
    gptq = json.loads((exported("w4a16-gptq-act-order")[1] / "config.json").read_text())["quantization_config"]
    assert gptq["config_groups"]["group_0"]["weights"]["actorder"] in ("static", "weight")
    assert gptq["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert json.loads((exported("w8a8-static")[1] / "config.json").read_text())["quantization_config"]["format"] \
        == "int-quantized"
    assert json.loads((exported("fp8")[1] / "config.json").read_text())["quantization_config"]["format"] \
        == "float-quantized"


# --- refusals: a clear error, nothing written ---------------------------------------------------------------------


@pytest.mark.parametrize(("recipe", "message"), [
    (Recipe(method="spqr", scheme="w4a16", group_size=G, options={"stat_group": 4, "outlier_rate": 0.01}), "SpQR"),
    (Recipe(scheme="w4a16", group_size=G, zero_point="float", symmetric=False), "float zero points"),
    (Recipe(scheme="w3a16", group_size=G), "3-bit weights"),
    (Recipe.preset("smoothquant-o2"), "dynamic per-tensor"),
    (Recipe(method="fp8", scheme="fp8", kv_cache="int8"), "int8 KV cache"),
    (Recipe(method="fp8", scheme="fp8", kv_cache="fp8"), "--kv-static"),
])
def test_unexportable_recipes_are_refused(recipe, message, stories_path, tmp_path):
    result = api.quantize(stories_path, recipe, tokenizer=lowbit.load_tokenizer(stories_path), calib=CALIB,
                          progress=False)
    with pytest.raises(UnsupportedExport, match=message):
        lowbit.export(result, "compressed-tensors", tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_quantize_refuses_before_quantizing(stories_path, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["quantize", str(stories_path), "--method", "spqr", "--scheme", "w4a16", "--group-size", "4",
                     "--format", "compressed-tensors", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "SpQR" in err and "nearest exportable choice" in err
    assert not out.exists()


def test_quantize_writes_compressed_tensors_directly(stories_path, tmp_path, story_ids):
    out = tmp_path / "ct"
    assert cli.main(["quantize", str(stories_path), "--scheme", "fp8", "--method", "fp8", "--kv-cache", "fp8",
                     "--calib-samples", "4", "--calib-seqlen", "128", "--format", "compressed-tensors",
                     "--out", str(out), "--quiet"]) == 0
    model = lowbit.load(out)
    assert model.lowbit_kv_cache == "fp8" and model.model.layers[0].self_attn.k_scale.item() > 0


def test_export_output_checks(exported, tmp_path, capsys):
    ckpt, ct = exported("w4a16-g-sym-full")
    assert cli.main(["export", str(ckpt), "--to", "compressed-tensors", "--out", str(ct)]) == 2
    assert "already exists" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert cli.main(["export", str(ckpt), "--to", "compressed-tensors", "--out", str(blocker / "out")]) == 2
    assert "not a writable directory" in capsys.readouterr().err
    if os.geteuid() != 0:  # permission bits do not bind root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        assert cli.main(["export", str(ckpt), "--to", "compressed-tensors", "--out", str(locked / "out")]) == 2
        assert "not a writable directory" in capsys.readouterr().err
    assert cli.main(["export", str(ckpt), "--to", "compressed-tensors", "--out", str(ct), "--overwrite"]) == 0
    assert cli.main(["export", str(ct), "--to", "compressed-tensors", "--out", str(tmp_path / "x")]) == 2
    assert "not a lowbit checkpoint" in capsys.readouterr().err


def test_sharded_export_loads_everywhere(exported, tmp_path, story_ids):
    ckpt, _ = exported("w4a16-g-sym-full")
    out = tmp_path / "sharded"
    lowbit.export(ckpt, "compressed-tensors", out, max_shard_bytes=100_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    want = _logits(lowbit.load(ckpt), story_ids)
    assert torch.equal(_logits(lowbit.load(out), story_ids), want)
    assert _rel(_logits(_transformers(out), story_ids), want) < 1e-4


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_damaged_and_unreadable_inputs(exported, tmp_path):
    _, ct = exported("w4a16-g-sym-full")
    truncated = _copy(ct, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LowbitError, match="truncated or damaged"):
        lowbit.load(truncated)

    newer = _copy(ct, tmp_path / "newer")
    config = json.loads((newer / "config.json").read_text())
    config["quantization_config"]["version"] = "0.99.0"
    (newer / "config.json").write_text(json.dumps(config))
    with pytest.raises(LowbitError, match="newer than the releases this lowbit reads"):
        lowbit.load(newer)

    other = _copy(ct, tmp_path / "other")
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(LowbitError, match="'bitsandbytes', which lowbit cannot read"):
        lowbit.load(other)
    assert cli.main(["info", str(other)]) == 2
