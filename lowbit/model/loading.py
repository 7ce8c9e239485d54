"""Loading float models: Hugging Face directories, .gguf files and built-in names, via transformers."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.model.adapt import adapt
from lowbit.model.architectures import Family, family_for
from lowbit.model.sources import Source, resolve


def family_of(model: nn.Module) -> Family:
    return family_for(getattr(model.config, "model_type", "?"))


def load_float(source: Source, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A float (unquantized) model from a built-in name, a Hugging Face directory or a .gguf file."""
    if source.kind == "builtin":
        from lowbit.model.builtin import builtin_checkpoint

        return load_hf(builtin_checkpoint(source.name), dtype)
    if source.kind == "hf":
        return load_hf(source.path, dtype)
    if source.kind == "gguf":
        return load_gguf(source.path, dtype)
    raise LowbitError(f"{source.name!r} is a lowbit checkpoint, not a float model.")


def load_hf(path: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as e:
        raise LowbitError(f"could not read the model config in {str(path)!r}: {e}") from None
    family_for(config.model_type)
    return adapt(AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval())


def load_gguf(path: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A .gguf file, dequantized by transformers (needs the `gguf` package); the GGUF marker is dropped."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    check_gguf(path)
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise LowbitError(f"could not read {str(path)!r} as a GGUF model: {e}") from None
    family_for(config.model_type)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    # The weights are plain dequantized floats now; a leftover quantization marker would confuse saving.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return adapt(model)


def check_gguf(path: Path) -> None:
    """Refuse a file that is not a whole GGUF (a truncated download, another format renamed) in one sentence, before
    any reader meets its missing bytes: the gguf package reads the header and maps every tensor's data."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as e:
        raise LowbitError(f"could not read {str(path)!r} as a GGUF model: it is truncated, damaged or not a GGUF file "
                          f"({type(e).__name__}: {e}). Download or export it again.") from None
    if end > path.stat().st_size:
        raise LowbitError(f"{str(path)!r} is truncated: its tensors need {end} bytes, the file has "
                          f"{path.stat().st_size}. Download or export it again.")


def load_gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(path).parent, gguf_file=Path(path).name)


def tokenizer_dir_or_gguf(name_or_path: str | Path) -> tuple[Path, str | None]:
    """Where the tokenizer of a model argument lives: (directory, gguf file name or None)."""
    source = resolve(name_or_path)
    if source.kind == "builtin":
        from lowbit.model.builtin import builtin_checkpoint

        return builtin_checkpoint(source.name), None
    if source.kind == "gguf":
        return source.path.parent, source.path.name
    return source.path, None
