"""Quantized checkpoints written by other tools, read into lowbit's packed runtime (QuantLinear).

A Hugging Face directory whose config.json has a `quantization_config` is read by the reader of its
`quant_method`: compressed-tensors (lowbit's export, llm-compressor), gptq (AutoGPTQ / GPTQModel) or awq
(AutoAWQ GEMM). The model is built on the meta device, its quantized layers become QuantLinear modules holding the
stored codes, scales and zero points, and every other tensor is assigned after the keys are checked — the same
two-phase load as lowbit's own checkpoints. Nothing beyond reading the files is needed at run time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io.checkpoint import assign_tensors
from lowbit.model.architectures import family_for
from lowbit.runtime import kvcache
from lowbit.runtime.qlinear import QuantLinear, set_module

READABLE = ("compressed-tensors", "gptq", "awq")


def quant_method(config_path: Path) -> str | None:
    """The `quant_method` of a config.json's quantization_config (None for a float model); refuses unknown ones."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LowbitError(f"could not read {str(config_path)!r}: {e}") from None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not qc:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method not in READABLE:
        raise LowbitError(f"{str(config_path.parent)!r} holds a model quantized by {method!r}, which lowbit cannot "
                          f"read; it reads {', '.join(READABLE)} checkpoints (and lowbit's own, and .gguf files).")
    return method


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory: model.safetensors, or the shards its index names."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise LowbitError(f"{str(index)!r} is not a valid safetensors index ({e}).") from None
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise LowbitError(f"{str(path)!r} has no .safetensors weights (lowbit does not read pickled .bin files).")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        f = path / name
        if not f.is_file():
            raise LowbitError(f"{str(path)!r} is incomplete: shard {name} named by its index is missing.")
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise LowbitError(f"could not read {str(f)!r} ({e}); the file is truncated or damaged. Copy or download "
                              f"it again.") from None
    return tensors


def _readers():
    from lowbit.io import compressed_tensors, gptq_awq

    return {"compressed-tensors": compressed_tensors.read_layers, "gptq": gptq_awq.read_gptq,
            "awq": gptq_awq.read_awq}


def load_foreign(path: str | Path, method: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers model whose quantized layers are QuantLinear modules holding the checkpoint's codes."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    qconfig = json.loads((path / "config.json").read_text())["quantization_config"]
    tensors = read_tensors(path)
    layers, kv = _readers()[method](qconfig, tensors, str(path))
    if not layers:
        raise LowbitError(f"{str(path)!r} says it is quantized ({method}) but holds no quantized layer lowbit "
                          f"recognizes.")
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    family = family_for(config.model_type)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, (qw, spec, bias, input_scale) in layers.items():
        module = QuantLinear.from_quantized(qw, spec, None if bias is None else bias.to(dtype), input_scale)
        set_module(model, name, module)
    static = None
    if kv:
        static = kvcache.attention_modules(model, family.blocks)
        names = {id(m): n for n, m in model.named_modules()}
        for attn in static:
            if names[id(attn)] not in kv:
                raise LowbitError(f"{str(path)!r} has a KV-cache scheme but no k_scale / v_scale for "
                                  f"{names[id(attn)]}.")
            k_scale, v_scale = kv[names[id(attn)]]
            attn.register_buffer("k_scale", k_scale)
            attn.register_buffer("v_scale", v_scale)
    qprefixes = tuple(n + "." for n in layers)
    expected = {k for k in model.state_dict() if not k.startswith(qprefixes)
                and not k.endswith((".k_scale", ".v_scale"))}
    tied = {}
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in tensors:
        embed = model.get_input_embeddings()
        tied = {"lm_head.weight": next(n for n, m in model.named_modules() if m is embed) + ".weight"}
    assign_tensors(model, tensors, expected - set(tied), tied, qprefixes, dtype, repr(str(path)))
    if static is not None:
        kvcache.enable(model, "fp8", static=static)
    model.lowbit_foreign = method
    return model.eval()
