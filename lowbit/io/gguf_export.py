"""`lowbit export DIR --to gguf --out FILE.gguf`: a lowbit checkpoint as a GGUF file for llama.cpp, written with the
`gguf` package (llama.cpp's own Python library).

Checkpoints quantized from a GGUF (a built-in model, or a .gguf file) or from a Hugging Face model of the Llama
family (lowbit.io.gguf_hf writes its metadata and tokenizer), whose layers are on llama.cpp's
legacy block types (`--scheme q8_0`, `q4_0`, `q4_1`, `q5_0`, `q5_1`: lowbit.formats.ggml), its k-quants and IQ4_NL
(`--scheme q2_k` … `q6_k`, `iq4_nl`, and the mixes `q3_k_m`, `q4_k_m`, `q5_k_m`: lowbit.formats.kquant). The source
GGUF gives the metadata (architecture, hyper-parameters, tokenizer), the tensor order and every tensor lowbit did not
quantize, copied byte for byte; each quantized layer is written in its block type. llama.cpp stores the query and key
projections of Llama-family models with the rows of each head in rotary pair order (its converter's `permute`;
transformers undoes it when loading a GGUF), so those layers' rows, with their per-row statistics, are put back
into that order. Anything else is refused in one sentence, before anything is written.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.formats.ggml import block_type, to_blocks
from lowbit.formats.kquant import KQuantWeight, to_blocks_k
from lowbit.formats.weight import QuantizedWeight

# llama.cpp's LLAMA_FTYPE_MOSTLY_* for a file whose layers are mostly of one type (k-quants: the _S variants)
FILE_TYPE = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k": 11, "q4_k": 14, "q5_k": 16,
             "q6_k": 18, "iq4_nl": 25}


def ggml_type(fmt) -> str | None:
    """The llama.cpp type name that stores this lowbit weight format exactly, or None."""
    if getattr(fmt, "kind", None) == "ggml":
        return fmt.type
    t = block_type(fmt)
    return t.name if t is not None else None


def ggml_bytes(qw) -> np.ndarray:
    return to_blocks_k(qw) if isinstance(qw, KQuantWeight) else to_blocks(qw)
ROPE_PERMUTED = {"attn_q": "head_count", "attn_k": "head_count_kv"}


def source_gguf(source_model: str) -> Path | None:
    """The GGUF a checkpoint was quantized from, or None for any other source (a Hugging Face model)."""
    from lowbit.model.builtin import BUILTINS, builtin_gguf

    if source_model in BUILTINS:
        return builtin_gguf(source_model)
    path = Path(source_model)
    if path.suffix.lower() == ".gguf" and path.is_file():
        return path
    return None


def check_gguf_target(model: str, recipe, out: str | Path, overwrite: bool) -> Path:
    """Before quantizing for `--format gguf`: the recipe's formats have llama.cpp types, the source can be described
    to llama.cpp, and `out` is a file that can be written (refused if it exists, unless `overwrite`)."""
    specs = [recipe.default_spec] + [s for o in recipe.overrides if (s := recipe.override_spec(o)) is not None]
    for spec in specs:
        if ggml_type(spec.weight) is None or spec.act is not None:
            raise LowbitError(f"--format gguf writes llama.cpp's block types; scheme {recipe.scheme} "
                              f"({spec.weight.to_dict()}) has none. Use --scheme q4_0, q5_0, q8_0, q4_1, q5_1, "
                              "q2_k … q6_k, iq4_nl or a mix (q3_k_m, q4_k_m, q5_k_m).")
    if source_gguf(str(model)) is None:
        from transformers import AutoConfig

        from lowbit.io.gguf_hf import hf_arch
        from lowbit.model.sources import resolve

        src = resolve(model)
        if src.kind != "hf":
            raise LowbitError(f"--format gguf quantizes a GGUF, a built-in model or a Hugging Face model; {model!r} is "
                              f"a {src.kind} checkpoint: export it with `lowbit export --to gguf` instead.")
        hf_arch(AutoConfig.from_pretrained(src.path))
    return check_gguf_out(out, overwrite)


def check_gguf_out(out: str | Path, overwrite: bool) -> Path:
    """Refuse, before any work, a .gguf output that exists (unless `overwrite`) or could not be written."""
    from lowbit.io.atomic import check_writable_file

    out = Path(out).expanduser()
    if out.is_dir() or (out.exists() and not overwrite):
        raise LowbitError(f"{str(out)!r} exists; a GGUF is one file: choose another --out or pass --overwrite.")
    return check_writable_file(out, "--out")


def check_layers(layers: dict[str, object]) -> str:
    """The main block type of the quantized layers; refuses a layer format that has no llama.cpp type."""
    kinds: dict[str, int] = {}
    for name, module in layers.items():
        t = ggml_type(module.spec.weight)
        if t is None or module.spec.act is not None:
            raise LowbitError(f"layer {name} is {module.spec.weight.to_dict()}"
                              f"{' with quantized activations' if module.spec.act else ''}, which no llama.cpp block "
                              "type stores; GGUF export takes --scheme q8_0, q4_0, q4_1, q5_0, q5_1, q2_k … q6_k, "
                              "iq4_nl or a mix (q3_k_m, q4_k_m, q5_k_m).")
        kinds[t] = kinds.get(t, 0) + 1
    if not kinds:
        raise LowbitError("the checkpoint has no quantized layers to write as llama.cpp blocks.")
    return max(kinds, key=kinds.get)


def export_gguf(model: torch.nn.Module, source_model: str, out: Path, tokenizer_dir: Path | None = None) -> Path:
    """Write `model` (a loaded lowbit checkpoint) as a GGUF at `out`, atomically. A GGUF source gives the metadata
    and the untouched tensors; a Hugging Face source (Llama family) its config and `tokenizer_dir`'s (else the
    source directory's) tokenizer.json (lowbit.io.gguf_hf)."""
    from lowbit.runtime.qlinear import QuantLinear

    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    main_type = check_layers(layers)
    src = source_gguf(source_model)
    if src is not None:
        from lowbit.model.loading import check_gguf

        reader = check_gguf(src)  # a source damaged since is refused before anything is written
        return _atomic(out, lambda tmp: _write_from_gguf(model, layers, reader, main_type, tmp))
    from lowbit.io.gguf_hf import hf_arch

    arch = hf_arch(model.config)  # refuses what it cannot describe, before anything is written
    directory = tokenizer_dir if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file() \
        else Path(source_model)
    return _atomic(out, lambda tmp: _write_from_hf(model, layers, arch, Path(directory), main_type, tmp))


def _atomic(out: Path, write) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as an ordinary new file, not mkstemp's owner-only mode
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _tensor_names(arch: str, blocks: int):
    import gguf

    arch_enum = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), None)
    if arch_enum is None:
        raise LowbitError(f"the architecture {arch!r} is unknown to the gguf package.")
    return gguf.get_tensor_name_map(arch_enum, blocks)


def _gguf_names(layers: dict, names, arch: str) -> dict:
    by_gguf = {}
    for name, module in layers.items():
        key = names.get_name(name + ".weight", try_suffixes=(".weight",))
        if key is None:
            raise LowbitError(f"layer {name} has no tensor name in llama.cpp's {arch} layout.")
        by_gguf[key] = module
    return by_gguf


def _float_tensors(model, names) -> dict[str, torch.Tensor]:
    """The model's unquantized parameters by their GGUF tensor name."""
    out = {}
    for name, p in model.named_parameters():
        key = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if key is not None:
            out[key] = p.detach()
    return out


def _changed(value: torch.Tensor | None, source, heads: dict[str, int]) -> np.ndarray | None:
    """The model's value of a float tensor the source stores in F32 or F16, where it is not the source's value (as the
    checkpoint's dtype rounds it): then lowbit changed it (scales folded into a norm, or into a layer left
    unquantized), and the file must hold it. q/k rows are compared and written in llama.cpp's rotary order."""
    import gguf

    from lowbit.io.gguf_hf import rotary_pairs

    types = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
    data = np.asarray(source.data)
    if value is None or source.tensor_type not in types or data.size != value.numel():
        return None
    base = source.name.split(".")[-2]
    if base in heads and value.dim() == 2:
        value = value[rotary_pairs(value.shape[0], heads[base])]
    src = torch.from_numpy(data.astype(np.float32)).reshape(value.shape)
    if torch.equal(src.to(value.dtype), value):
        return None
    return value.float().numpy().astype(types[source.tensor_type]).reshape(data.shape)


def _quantized(module, key: str, heads: dict[str, int]) -> tuple[np.ndarray, object]:
    """A quantized layer's ggml bytes and type, its rows in llama.cpp's rotary order where `heads` names them."""
    import gguf

    qw = module.quantized_weight()
    base = key.split(".")[-2]
    if base in heads:
        qw = _rope_rows(qw, heads[base])
    return ggml_bytes(qw), getattr(gguf.GGMLQuantizationType, ggml_type(qw.fmt).upper())


def _write_from_gguf(model, layers: dict, reader, main_type: str, tmp: str) -> None:
    import gguf

    arch = reader.fields["general.architecture"].contents()
    by_gguf = _gguf_names(layers, _tensor_names(arch, int(reader.fields[f"{arch}.block_count"].contents())), arch)
    present = {t.name for t in reader.tensors}
    missing = sorted(set(by_gguf) - present)
    if missing:
        raise LowbitError(f"the source GGUF has no tensor {missing[0]} for a quantized layer (it may tie it to "
                          "another); export the layers the source stores.")
    heads = {base: int(reader.fields[f"{arch}.attention.{key}"].contents()) for base, key in ROPE_PERMUTED.items()}
    floats = _float_tensors(model, _tensor_names(arch, int(reader.fields[f"{arch}.block_count"].contents())))
    writer = gguf.GGUFWriter(tmp, arch)
    _copy_metadata(reader, writer, FILE_TYPE[main_type])
    for t in reader.tensors:
        module = by_gguf.get(t.name)
        changed = _changed(floats.get(t.name), t, heads)
        if changed is not None:  # a norm (or unquantized layer) that AWQ or SmoothQuant folded scales into
            writer.add_tensor(t.name, changed, raw_dtype=t.tensor_type)
            continue
        if module is None:  # untouched by lowbit: the source's own bytes and type
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
            continue
        data, qtype = _quantized(module, t.name, heads)
        writer.add_tensor(t.name, data, raw_dtype=qtype)
    _finish(writer)


def _write_from_hf(model, layers: dict, arch: str, tokenizer_dir: Path, main_type: str, tmp: str) -> None:
    import gguf

    from lowbit.io.gguf_hf import PERMUTED, add_hparams, add_tokenizer, float_tensor, rotary_pairs

    config = model.config
    names = _tensor_names(arch, config.num_hidden_layers)
    by_gguf = _gguf_names(layers, names, arch)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    heads = {"attn_q": config.num_attention_heads, "attn_k": kv_heads} if arch in PERMUTED else {}
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_name(str(getattr(config, "_name_or_path", "") or "lowbit model"))
    add_hparams(writer, config, arch)
    add_tokenizer(writer, tokenizer_dir, config.vocab_size)
    writer.add_file_type(FILE_TYPE[main_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    quantized = {id(m) for m in layers.values()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key, module in by_gguf.items():
        data, qtype = _quantized(module, key, heads)
        writer.add_tensor(key, data, raw_dtype=qtype)
    for name, module in model.named_modules():
        if id(module) in quantized:
            continue
        for pname, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            full = f"{name}.{pname}"
            if pname not in ("weight", "bias") or (tied and full == "lm_head.weight"):
                continue
            key = names.get_name(full, try_suffixes=(".weight", ".bias"))
            if key is None:
                raise LowbitError(f"tensor {full} has no name in llama.cpp's {arch} layout; GGUF export cannot place "
                                  "it.")
            base = key.split(".")[-2]
            if base in heads and t.dim() == 2:
                t = t[rotary_pairs(t.shape[0], heads[base])]
            writer.add_tensor(key, float_tensor(t))
    _finish(writer)


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _copy_metadata(reader, writer, file_type: int) -> None:
    import gguf

    skip = {"general.architecture", "general.file_type", "general.quantization_version"}
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in skip:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope_rows(qw: QuantizedWeight | KQuantWeight, heads: int) -> QuantizedWeight | KQuantWeight:
    """Rows of each head in llama.cpp's rotary order (lowbit.io.gguf_hf.rotary_pairs), for codes and per-row
    statistics alike."""
    from lowbit.io.gguf_hf import rotary_pairs

    idx = rotary_pairs(qw.codes.shape[0], heads)
    if isinstance(qw, KQuantWeight):
        return KQuantWeight(qw.fmt, qw.codes[idx], {k: v[idx] for k, v in qw.stats.items()})
    return QuantizedWeight(qw.fmt, qw.codes[idx], qw.scale[idx], None if qw.zero is None else qw.zero[idx],
                           qw.g_idx)
