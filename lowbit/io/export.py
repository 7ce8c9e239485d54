"""`lowbit export`: write a quantized model in a format other engines load (compressed-tensors for vLLM, SGLang and
transformers). Everything is checked before anything is written; the output appears atomically or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_directory, check_output_dir
from lowbit.io.checkpoint import quantized_layers, sha256
from lowbit.io.compressed_tensors import (
    Mapped,
    UnsupportedExport,
    build_config,
    export_tensors,
    map_spec,
    write_safetensors,
)
from lowbit.methods.gptq import GPTQConfig
from lowbit.model.loading import family_of
from lowbit.recipe import Recipe
from lowbit.runtime import kvcache

TARGETS = ("compressed-tensors", "gguf")
DEFAULT_SHARD_BYTES = 5 * 1024**3


# Families whose lowbit layout differs from what transformers and vLLM read: per-expert layers where they keep
# fused expert tensors (or per-expert names of their own), nn.Linear where GPT-2 keeps Conv1D's transposed weights.
NO_COMPRESSED_TENSORS = {"moe": "split experts into per-expert layers", "gpt2": "made Conv1D layers nn.Linear"}


def check_family(model_type: str) -> None:
    """Refuse, before anything is quantized or written, a family whose compressed-tensors layout is not written."""
    from lowbit.model.architectures import family_for

    family = family_for(model_type)
    if family.name in NO_COMPRESSED_TENSORS:
        raise LowbitError(f"compressed-tensors export of the {family.name} family ({model_type}) is not written yet: "
                          f"lowbit {NO_COMPRESSED_TENSORS[family.name]}, and the tensors would have to go back to "
                          f"the layout transformers and vLLM read. Save a lowbit checkpoint instead (it loads with "
                          f"lowbit.load and `lowbit eval`).")


def check_target(to: str) -> str:
    if to not in TARGETS:
        raise LowbitError(f"unknown export format {to!r}: use {', '.join(TARGETS)}.")
    return to


def check_writable(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output (without overwrite) or a location that cannot be written, before any work."""
    out = check_output_dir(out, overwrite)
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    try:  # the real test (permission bits do not bind root): create and remove a probe directory
        os.rmdir(tempfile.mkdtemp(prefix=".lowbit-probe-", dir=parent))
    except OSError as e:
        raise LowbitError(f"cannot write {str(out)!r}: {str(parent)!r} is not a writable directory ({e.strerror}). "
                          f"Choose another --out.") from None
    return out


def _static_act_order(recipe: Recipe) -> bool:
    """Whether GPTQ visited the (integer-grid) layers in act-order, with static groups."""
    gptq = next((c for c in recipe.configs() if isinstance(c, GPTQConfig)), None)
    return gptq is not None and gptq.ordered_on_int_grids


def check_recipe(recipe: Recipe) -> None:
    """Refuse, before quantizing, a recipe whose result compressed-tensors cannot hold."""
    act_order = _static_act_order(recipe)
    map_spec("(every targeted layer)", recipe.default_spec, act_order)
    for o in recipe.overrides:
        spec = recipe.override_spec(o)
        if spec is not None:
            map_spec(f"matching {o.pattern!r}", spec, act_order)
    check_kv(recipe)


def check_kv(recipe: Recipe) -> bool:
    """Whether the KV cache is exported; refuses what vLLM's kv_cache_scheme cannot hold."""
    if "attention" in recipe.parts:
        raise UnsupportedExport("the `attention` part quantizes attention queries, which compressed-tensors has no "
                                "place for; the nearest exportable choice is --parts L3 (KV cache, 16-bit queries).")
    if not recipe.kv_cache:
        return False
    if recipe.kv_cache != "fp8":
        raise UnsupportedExport("an int8 KV cache cannot be served from compressed-tensors (vLLM stores KV in fp8); "
                                "the nearest exportable choice is --kv-cache fp8.")
    if not recipe.kv_static:
        raise UnsupportedExport("this KV cache has dynamic per-token scales, but vLLM reads one static k_scale and "
                                "v_scale per layer; re-quantize with --kv-static (`lowbit quantize --format "
                                "compressed-tensors` calibrates them itself).")
    return True


TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
                   "chat_template.*")


def _source(source):
    """(model, recipe, storage dtype, checkpoint directory or None) from a checkpoint path, a QuantizeResult or a
    loaded model."""
    from lowbit.api import QuantizeResult
    from lowbit.io.checkpoint import load_checkpoint
    from lowbit.model.sources import resolve

    if isinstance(source, QuantizeResult):
        return source.model, source.recipe, source.dtype, None
    directory = None
    if isinstance(source, nn.Module):
        header = getattr(source, "lowbit_header", None)
        if header is None:
            raise LowbitError("this model was not made by lowbit (no header): quantize it with lowbit.quantize(), or "
                              "pass the checkpoint directory.")
    else:
        src = resolve(source)
        if src.kind != "lowbit":
            raise LowbitError(f"{str(source)!r} is not a lowbit checkpoint; export takes what `lowbit quantize` wrote "
                              f"(quantize the model first).")
        directory = src.path
        source = load_checkpoint(directory)
        header = source.lowbit_header
    recipe = Recipe.from_dict(header.get("recipe") or {})
    return source, recipe, getattr(torch, header["dtype"]), directory


def export(source, to: str, out: str | Path, *, tokenizer=None, overwrite: bool = False,
           max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Write `source` (a lowbit checkpoint directory, a QuantizeResult or a model lowbit loaded) as `to` in `out`,
    with `tokenizer` or else the checkpoint directory's tokenizer files.

    Returns {"files": {name: sha256}, "bytes_on_disk": n}. Refuses, before writing anything, what the format
    cannot express.
    """
    check_target(to)
    if to == "gguf":
        return _export_gguf(source, out, overwrite)
    out = check_writable(out, overwrite)
    model, recipe, dtype, directory = _source(source)
    check_family(model.config.model_type)
    qlayers = quantized_layers(model)
    if not qlayers:
        raise LowbitError("the model has no quantized layer; there is nothing for compressed-tensors to describe.")
    act_order = _static_act_order(recipe)
    mapped: dict[str, Mapped] = {name: map_spec(name, m.spec, act_order) for name, m in qlayers.items()}
    kv = check_kv(recipe)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or n in qlayers]
    kv_scales = {}
    if kv:
        names = {id(m): n for n, m in model.named_modules()}
        for attn in kvcache.attention_modules(model, family_of(model).blocks):
            kv_scales[f"{names[id(attn)]}.k_scale"], kv_scales[f"{names[id(attn)]}.v_scale"] = \
                attn.k_scale, attn.v_scale
    tensors = export_tensors(model, mapped, dtype, kv_scales)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = build_config(mapped, linear_names, kv)
    with atomic_directory(out, overwrite) as tmp:
        write_safetensors(tensors, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif directory is not None:  # the checkpoint's own tokenizer files, as they are
            for f in {f for pattern in TOKENIZER_FILES for f in directory.glob(pattern)}:
                shutil.copyfile(f, tmp / f.name)
        files = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        size = sum((tmp / f).stat().st_size for f in files)
    return {"files": files, "bytes_on_disk": size}


def _export_gguf(source, out: str | Path, overwrite: bool) -> dict:
    """One .gguf file (lowbit.io.gguf_export), refused before any work if it exists or cannot be written."""
    from lowbit.api import QuantizeResult
    from lowbit.io.gguf_export import check_gguf_out, export_gguf

    out = check_gguf_out(out, overwrite)
    source_model = source.source if isinstance(source, QuantizeResult) else None
    model, _, _, directory = _source(source)
    if source_model is None:
        source_model = model.lowbit_header.get("source_model", "")
    export_gguf(model, str(source_model), out, directory)
    return {"files": {out.name: sha256(out)}, "bytes_on_disk": out.stat().st_size}
