"""What a model argument names: a built-in model, a lowbit checkpoint, a Hugging Face directory or a .gguf file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.model.builtin import BUILTINS

CHECKPOINT_HEADER = "lowbit.json"


@dataclass(frozen=True)
class Source:
    kind: str  # "builtin" | "lowbit" | "hf" | "gguf" | a foreign quant_method: "compressed-tensors" | "gptq" | "awq"
    path: Path
    name: str


def resolve(name_or_path: str | Path) -> Source:
    text = str(name_or_path)
    if text.lower() in BUILTINS:
        return Source("builtin", Path(), text.lower())
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / CHECKPOINT_HEADER).is_file():
            return Source("lowbit", path, text)
        if (path / "config.json").is_file():
            from lowbit.io.foreign import quant_method

            return Source(quant_method(path / "config.json") or "hf", path, text)
        raise LowbitError(f"directory {text!r} is neither a lowbit checkpoint (no {CHECKPOINT_HEADER}) nor a Hugging "
                          f"Face model (no config.json).")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return Source("gguf", path, text)
        raise LowbitError(f"{text!r} is a file but not a .gguf model; give a model directory, a .gguf file or a "
                          f"built-in name ({', '.join(BUILTINS)}).")
    raise LowbitError(f"no model {text!r}: it is not a built-in name ({', '.join(BUILTINS)}) and no such file or "
                      f"directory exists.")
