"""Loading float models: Hugging Face directories, .gguf files and built-in names, via transformers."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.hardware import resolve_device
from lowbit.io.atomic import atomic_directory
from lowbit.model.adapt import adapt
from lowbit.model.architectures import Family, family_for
from lowbit.model.builtin import builtin_gguf, cache_dir
from lowbit.model.sources import Source, resolve

if TYPE_CHECKING:
    from gguf import GGUFReader


def family_of(model: nn.Module) -> Family:
    return family_for(getattr(model.config, "model_type", "?"))


def load_float(source: Source, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A float (unquantized) model from a built-in name, a Hugging Face directory or a .gguf file."""
    if source.kind == "builtin":
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
    model = adapt(AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval())
    model.checkpoint_dtype = checkpoint_dtype(config)
    return model


def checkpoint_dtype(config) -> torch.dtype | None:
    """The 16-bit dtype a checkpoint's config declares, read before loading: transformers overwrites the config's
    dtype with the one the model is loaded in (float32 here)."""
    own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(str(own).removeprefix("torch."))


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


def check_gguf(path: Path) -> GGUFReader:
    """The gguf package's reader of `path`, after refusing in one sentence, before any reader meets its missing bytes,
    a file that is not a whole GGUF this reader reads: another format (renamed, or an HTML error page saved as the
    download), a GGUF version it does not read, or a truncated file. The reader is kept for the next call on the same
    unchanged file (reading a GGUF's header takes seconds: its vocabulary is in it)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as e:
        raise LowbitError(f"could not read {str(path)!r}: {e.strerror}.") from None
    return _checked_gguf(path, stat.st_size, (stat.st_ino, stat.st_mtime_ns))


@functools.lru_cache(maxsize=2)
def _checked_gguf(path: Path, size: int, _version: tuple[int, int]) -> GGUFReader:
    import gguf
    from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

    fix = "Download or export it again."
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise LowbitError(f"could not read {str(path)!r}: {e.strerror}.") from None
    if not size:
        raise LowbitError(f"{str(path)!r} is empty (0 bytes), not a GGUF model. {fix}")
    if head[:4] != b"GGUF":
        raise LowbitError(f"{str(path)!r} is not a GGUF file: it does not start with the GGUF magic bytes (it starts "
                          f"with {head[:4]!r}). {fix}")
    if len(head) < 8:
        raise LowbitError(f"{str(path)!r} is truncated: {size} bytes, not even a GGUF header. {fix}")
    version = int.from_bytes(head[4:8], "little")
    if version & 0xFFFF == 0:  # written for the other byte order, as the gguf package reads it
        version = int.from_bytes(head[4:8], "big")
    if version not in READER_SUPPORTED_VERSIONS:
        newer = version > max(READER_SUPPORTED_VERSIONS)
        raise LowbitError(f"{str(path)!r} is GGUF version {version}, which the installed gguf package does not read "
                          f"(it reads versions {', '.join(map(str, READER_SUPPORTED_VERSIONS))}). "
                          + ("Update the gguf package (pip install -U gguf)." if newer else
                             "Convert the model again with a current llama.cpp (convert_hf_to_gguf.py)."))
    try:
        reader = gguf.GGUFReader(path)
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as e:
        raise LowbitError(f"{str(path)!r} is truncated or damaged: a GGUF version {version} file whose header or "
                          f"tensor data cannot be read whole ({type(e).__name__}: {e}). {fix}") from None
    if end > size:
        raise LowbitError(f"{str(path)!r} is truncated: its tensors need {end} bytes, the file has {size}. {fix}")
    return reader


def describe_gguf(path: Path) -> dict:
    """What a .gguf file holds, from its header alone (nothing is dequantized): architecture, name, file type,
    tensors by llama.cpp type, bits per weight over all tensors, bytes."""
    import gguf

    reader = check_gguf(path)

    def field(key: str):
        return reader.fields[key].contents() if key in reader.fields else None

    arch, file_type = field("general.architecture"), field("general.file_type")
    try:
        file_type = gguf.LlamaFileType(file_type).name if file_type is not None else None
    except ValueError:
        pass  # a type this gguf package does not name: its number
    elements = sum(int(t.n_elements) for t in reader.tensors)
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"format": "gguf", "gguf_version": field("GGUF.version"), "architecture": arch,
            "name": field("general.name"), "file_type": file_type, "blocks": field(f"{arch}.block_count"),
            "tensors": len(reader.tensors), "tensor_types": types,
            "bits_per_weight": 8 * sum(int(t.n_bytes) for t in reader.tensors) / elements if elements else None,
            "bytes_on_disk": Path(path).stat().st_size}


def load_gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(path).parent, gguf_file=Path(path).name)


def tokenizer_dir_or_gguf(name_or_path: str | Path) -> tuple[Path, str | None]:
    """Where the tokenizer (and config) of a model argument lives: (directory, gguf file name or None); a .gguf file
    is checked whole first (check_gguf)."""
    source = resolve(name_or_path)
    if source.kind == "builtin":
        return builtin_checkpoint(source.name), None
    if source.kind == "gguf":
        check_gguf(source.path)
        return source.path.parent, source.path.name
    return source.path, None


def load(name_or_path: str | Path, dtype: torch.dtype | None = None, verify: bool = True,
         device: str | torch.device = "cpu", progress: bool = True) -> nn.Module:
    """The one way in: a lowbit checkpoint, a Hugging Face directory, a .gguf file or a built-in name.

    A lowbit checkpoint, and a compressed-tensors, GPTQ or AWQ directory, come back with QuantLinear layers that keep
    packed weights; the others as float models. `device="cuda"` moves the model to the GPU and readies the packed
    layers for lowbit's kernels (lowbit.kernels); there the default dtype is bfloat16, since the kernels take
    16-bit activations. On the CPU the default is float32. `progress=False` silences transformers' loading bars.
    """
    dev = resolve_device(device)
    source = resolve(name_or_path)
    load_dtype = dtype or torch.float32
    from lowbit.io.checkpoint import load_checkpoint
    from lowbit.io.foreign import READABLE, load_foreign

    with transformers_bars(progress):
        if source.kind == "lowbit":
            model = load_checkpoint(source.path, load_dtype, verify)
        elif source.kind in READABLE:
            model = load_foreign(source.path, source.kind, load_dtype)
        else:
            model = load_float(source, load_dtype)
    if dev.type != "cpu":
        model = to_device(model, dev, dtype or torch.bfloat16)
    return model


@contextmanager
def transformers_bars(show: bool) -> Iterator[None]:
    """transformers' own progress bars (loading weights, converting a GGUF) on or off for the block."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was and not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not show:
            hf_logging.enable_progress_bar()


def to_device(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move a loaded model to `device` in `dtype` (floating tensors; packed codes keep theirs) and, on a GPU, put
    every quantized layer that has a kernel into the kernels' layout once."""
    from lowbit.runtime.qlinear import QuantLinear

    model.to(device=device)
    for module in model.modules():
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t is not None and t.is_floating_point() and t.dtype != dtype and not _keeps_dtype(module, name):
                t.data = t.data.to(dtype)
    model.config.dtype = dtype
    if dtype in (torch.float16, torch.bfloat16):
        model.checkpoint_dtype = None  # the 16-bit dtype it now has is the one to store
    if device.type == "cuda":
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.prepare_kernels()
    return model


def _keeps_dtype(module: nn.Module, name: str) -> bool:
    """Quantization statistics keep their stored dtype (scales, fp8 codes, static input scales)."""
    from lowbit.runtime.qlinear import QuantLinear

    return isinstance(module, QuantLinear) and name != "bias"


def load_tokenizer(name_or_path: str | Path):
    from transformers import AutoTokenizer

    directory, gguf = tokenizer_dir_or_gguf(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(directory, **({"gguf_file": gguf} if gguf else {}))
    except (ValueError, OSError, KeyError) as e:
        raise LowbitError(f"could not load the tokenizer of {str(name_or_path)!r} ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0]}). A model directory needs its tokenizer files "
                          f"(tokenizer.json or the model's own); copy them in from the original model.") from None


def model_type(name_or_path: str | Path) -> str:
    """The transformers model_type of a model argument, from its config alone (no weights are read)."""
    from transformers import AutoConfig

    directory, gguf = tokenizer_dir_or_gguf(name_or_path)
    try:
        config = AutoConfig.from_pretrained(directory, **({"gguf_file": gguf} if gguf else {}))
    except (ValueError, KeyError, OSError) as e:
        raise LowbitError(f"could not read the model config of {str(name_or_path)!r}: {e}") from None
    return config.model_type


def builtin_checkpoint(name: str) -> Path:
    """The built-in model as a Hugging Face safetensors directory, converted once and cached."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    gguf = builtin_gguf(name)
    print(f"lowbit: converting {gguf.name} to a safetensors checkpoint (once; about half a minute on 2 cores) in "
          f"{target}", file=sys.stderr)
    start = time.perf_counter()
    model = load_gguf(gguf)
    tokenizer = load_gguf_tokenizer(gguf)
    with atomic_directory(target, overwrite=False) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"lowbit: converted in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return target
