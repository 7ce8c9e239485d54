"""`lowbit export DIR --to gguf --out FILE.gguf`: a lowbit checkpoint as a GGUF file for llama.cpp, written with the
`gguf` package (llama.cpp's own Python library).

Built so far: checkpoints quantized from a GGUF (a built-in model, or a .gguf file), whose layers are on llama.cpp's
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


def source_gguf(source_model: str) -> Path:
    """The GGUF a checkpoint was quantized from, or an error saying why GGUF export cannot use it."""
    from lowbit.model.builtin import BUILTINS, builtin_gguf

    if source_model in BUILTINS:
        return builtin_gguf(source_model)
    path = Path(source_model)
    if path.suffix.lower() == ".gguf" and path.is_file():
        return path
    raise LowbitError(f"GGUF export takes its metadata and tokenizer from the GGUF the model was quantized from; "
                      f"this checkpoint's source is {source_model!r}, and writing GGUF metadata for Hugging Face "
                      "sources is not built yet. Quantize from a .gguf file (or a built-in model) to export to GGUF.")


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


def export_gguf(model: torch.nn.Module, source_model: str, out: Path) -> Path:
    """Write `model` (a loaded lowbit checkpoint) as a GGUF at `out`, atomically."""
    import gguf

    from lowbit.runtime.qlinear import QuantLinear

    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    main_type = check_layers(layers)
    src = source_gguf(source_model)
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    arch_enum = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), None)
    blocks = int(reader.fields[f"{arch}.block_count"].contents())
    if arch_enum is None:
        raise LowbitError(f"the source GGUF's architecture {arch!r} is unknown to the gguf package.")
    names = gguf.get_tensor_name_map(arch_enum, blocks)
    by_gguf = {}
    for name, module in layers.items():
        key = names.get_name(name + ".weight", try_suffixes=(".weight",))
        if key is None:
            raise LowbitError(f"layer {name} has no tensor name in llama.cpp's {arch} layout.")
        by_gguf[key] = module
    present = {t.name for t in reader.tensors}
    missing = sorted(set(by_gguf) - present)
    if missing:
        raise LowbitError(f"the source GGUF has no tensor {missing[0]} for a quantized layer (it may tie it to "
                          "another); export the layers the source stores.")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        _copy_metadata(reader, writer, FILE_TYPE[main_type])
        for t in reader.tensors:
            module = by_gguf.get(t.name)
            if module is None:  # untouched by lowbit: the source's own bytes and type
                writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
                continue
            qw = module.quantized_weight()
            base = t.name.split(".")[-2]
            if base in ROPE_PERMUTED:
                heads = int(reader.fields[f"{arch}.attention.{ROPE_PERMUTED[base]}"].contents())
                qw = _rope_rows(qw, heads)
            qtype = getattr(gguf.GGMLQuantizationType, ggml_type(qw.fmt).upper())
            writer.add_tensor(t.name, ggml_bytes(qw), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


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
    """Rows of each head from transformers' order (first halves, then second halves of the rotary pairs) to
    llama.cpp's (pairs interleaved), for codes and per-row statistics alike."""
    rows = qw.codes.shape[0]
    idx = torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)
    if isinstance(qw, KQuantWeight):
        return KQuantWeight(qw.fmt, qw.codes[idx], {k: v[idx] for k, v in qw.stats.items()})
    return QuantizedWeight(qw.fmt, qw.codes[idx], qw.scale[idx], None if qw.zero is None else qw.zero[idx],
                           qw.g_idx)
