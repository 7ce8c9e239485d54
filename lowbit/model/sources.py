"""What a model argument names: a built-in model, a lowbit checkpoint, a Hugging Face directory or a .gguf file —
or a served model (`openai+http://HOST:PORT/v1#MODEL`, lowbit.eval.endpoint), which is never taken for a path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.model.builtin import BUILTINS

CHECKPOINT_HEADER = "lowbit.json"
SERVED_PREFIX = "openai+"


def is_served(name_or_path: object) -> bool:
    """Whether a model argument names a served model (an OpenAI-compatible API), not a file or a built-in name."""
    return isinstance(name_or_path, str) and name_or_path.strip().lower().startswith(SERVED_PREFIX)


@dataclass(frozen=True)
class Source:
    kind: str  # "builtin" | "lowbit" | "hf" | "gguf" | a foreign quant_method: "compressed-tensors" | "gptq" | "awq"
    # | "served" (only where the caller asks for it)
    path: Path
    name: str


def resolve(name_or_path: str | Path, served: bool = False) -> Source:
    """What `name_or_path` names. A served model is a Source of kind "served" where the caller takes one (`served`),
    else refused: its files are not here to load."""
    text = str(name_or_path)
    if is_served(name_or_path):
        if served:
            return Source("served", Path(), text.strip())
        raise LowbitError(f"{text!r} is a served model (an OpenAI-compatible API); only `lowbit eval` takes one "
                          "(--candidate, --reference). This needs the model's files: give a directory, a .gguf "
                          "file or a built-in name.")
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
