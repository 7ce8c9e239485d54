"""A Hugging Face model directory's weights, read lazily: one tensor at a time, from its shard mapped for the read.

Nothing is read until asked for; `get` copies one tensor out of its shard. The directory's identity
(`fingerprint`) is the sha256 of every shard's safetensors header and size, which is cheap to compute and changes
when any tensor's name, shape, dtype or the file's length does.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lowbit.errors import LowbitError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def shard_map(directory: Path, remedy: str = "download the model again") -> dict[str, str]:
    """tensor name → shard file name, from the index or the single file. `remedy` ends the error on a bad index."""
    index = directory / INDEX
    if index.is_file():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise LowbitError(f"{str(index)!r} is not a valid safetensors index ({e}); {remedy}.") from None
    if (directory / SINGLE).is_file():
        return dict.fromkeys(read_header(directory / SINGLE), SINGLE)
    raise LowbitError(f"{str(directory)!r} has no {SINGLE} and no {INDEX}: its weights are not in safetensors "
                      f"shards, which streaming reads. Convert the model with transformers' save_pretrained.")


def read_header(path: Path) -> dict:
    """The safetensors header of a file (its tensors' names, dtypes, shapes and offsets), without __metadata__."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"{str(path)!r} is not a readable safetensors file ({type(e).__name__}: {e}); it is "
                          f"truncated or damaged. Download the model again.") from None
    header.pop("__metadata__", None)
    return header


class LazyWeights:
    """The tensors of a model directory, by name, each read when asked for."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.where = shard_map(self.directory)

    def keys(self) -> set[str]:
        return set(self.where)

    def nbytes(self) -> int:
        """The shards' size on disk."""
        return sum((self.directory / f).stat().st_size for f in set(self.where.values()))

    def get(self, name: str) -> torch.Tensor:
        shard = self.where.get(name)
        if shard is None:
            raise LowbitError(f"{str(self.directory)!r} has no tensor {name!r}; its shards do not match its config.")
        # The shard is mapped for this one tensor and unmapped after: pages read from a long-lived mapping would
        # stay in this process's resident memory, and reading a whole model would then look like holding it.
        try:
            with safe_open(str(self.directory / shard), framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise LowbitError(f"could not read {name!r} from {str(self.directory / shard)!r} ({e}); it is truncated "
                              f"or damaged. Download the model again.") from None

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for shard in sorted(set(self.where.values())):
            path = self.directory / shard
            h.update(shard.encode())
            h.update(str(path.stat().st_size).encode())
            h.update(json.dumps(read_header(path), sort_keys=True).encode())
        return h.hexdigest()
