"""Which parts of a model are quantized (`--parts`): named groups of layers, and Fireworks' levels.

Parts:
- `mlp`, `qkv`, `o_proj`: those linear layers of the decoder blocks (per family, lowbit.model.architectures);
- `first_last`: apply the chosen linear parts in the first and the last decoder block too (left out otherwise,
  the layers most sensitive to quantization);
- `lm_head`: the output projection;
- `kv_cache`: keys and values are stored quantized (read back quantized by every later token);
- `attention`: the attention matmuls themselves see quantized queries, keys and values, prefill included.

Levels, as Fireworks publishes them: L1 = MLP except the first and last block; L2 = L1 + those blocks' MLP +
QKV; L3 = L2 + KV cache; L4 = L3 + attention in prefill. Without `--parts`, every linear layer of every
decoder block is quantized (lm_head and the KV cache are not).
"""

from __future__ import annotations

from torch import nn

from lowbit.errors import LowbitError
from lowbit.model.architectures import Family, decoder_blocks, expand

LINEAR_PARTS = ("mlp", "qkv", "o_proj")
PARTS = (*LINEAR_PARTS, "first_last", "lm_head", "kv_cache", "attention")
LEVELS: dict[str, tuple[str, ...]] = {
    "L1": ("mlp",),
    "L2": ("mlp", "qkv", "first_last"),
    "L3": ("mlp", "qkv", "first_last", "kv_cache"),
    "L4": ("mlp", "qkv", "first_last", "kv_cache", "attention"),
}


def expand_parts(parts: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Levels expanded and names checked; order kept, duplicates dropped."""
    out: list[str] = []
    for p in parts:
        names = LEVELS.get(p.upper(), (p.lower(),)) if isinstance(p, str) else (p,)
        for name in names:
            if name not in PARTS:
                raise LowbitError(f"unknown part {p!r} in --parts; parts: {', '.join(PARTS)}; levels: "
                                  f"{', '.join(LEVELS)}.")
            if name not in out:
                out.append(name)
    return tuple(out)


def part_layers(model: nn.Module, family: Family, parts: tuple[str, ...]) -> list[str]:
    """Full names of the linear layers the parts select, block by block."""
    parts = expand_parts(parts)
    if not family.parts:
        raise LowbitError(f"--parts is not mapped for the {family.name} family yet; use --targets / --ignore.")
    blocks = decoder_blocks(model, family)
    ends = set() if "first_last" in parts else {0, len(blocks) - 1}
    patterns = [layer for part in LINEAR_PARTS if part in parts for layer in family.part_layers(part)]
    names = [f"{family.blocks}.{i}.{n}" for i, block in enumerate(blocks) if i not in ends
             for n in expand(patterns, [m for m, _ in block.named_modules()])]
    if "lm_head" in parts:
        names.append(family.lm_head)
    return names
