"""The scales a block transform chose (AWQ, SmoothQuant), as a file beside the checkpoint: `scales.safetensors`.

Keys are `{block}/{prev}/s` (the scale folded into the scaling group after `prev`) and `{block}/{layer}/clip`
(AWQ's shrink factors of the layer's range); the metadata holds the method and each group's α. `--reuse-scales`
applies a saved file instead of searching again (lowbit.methods.transform).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lowbit.errors import LowbitError
from lowbit.methods.transform import BlockScales

SCALES_FILE = "scales.safetensors"


def scales_file(blocks: dict[int, BlockScales], transform: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) for safetensors."""
    tensors = {}
    for i, b in blocks.items():
        tensors |= {f"{i}/{prev}/s": s.float().cpu().contiguous() for prev, s in b.scales.items()}
        tensors |= {f"{i}/{name}/clip": p.float().cpu().contiguous() for name, p in b.clip.items()}
    alpha = {str(i): b.alpha for i, b in blocks.items()}
    return tensors, {"transform": transform, "alpha": json.dumps(alpha)}


def load_scales(path: str | Path, transform: str) -> dict[int, BlockScales]:
    """The per-block scales in `path` (a scales.safetensors file, or a checkpoint directory holding one), checked to
    come from the same transform."""
    path = Path(path)
    file = path / SCALES_FILE if path.is_dir() else path
    try:
        with safe_open(str(file), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise LowbitError(f"could not read scales from {str(file)!r}: {e}. Give a {SCALES_FILE} that lowbit wrote "
                          f"beside an AWQ or SmoothQuant checkpoint, or that checkpoint's directory.") from None
    if metadata.get("transform") != transform:
        raise LowbitError(f"{str(file)!r} holds {metadata.get('transform') or 'no lowbit'} scales, and this run's "
                          f"method uses {transform}'s: reuse scales with the method that searched them.")
    blocks: dict[int, BlockScales] = {}
    for key, t in tensors.items():
        i, name, kind = key.split("/")
        b = blocks.setdefault(int(i), BlockScales())
        (b.scales if kind == "s" else b.clip)[name] = t
    for i, alpha in json.loads(metadata.get("alpha", "{}")).items():
        blocks.setdefault(int(i), BlockScales()).alpha.update(alpha)
    return blocks
