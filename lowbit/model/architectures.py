"""Where each architecture family keeps its decoder blocks, embeddings, final norm and linear layers.

Architecture knowledge is data: supporting a new family is one `Family` entry in `FAMILIES`, not a new code
path. Paths are dotted module names inside the `*ForCausalLM` model; `sequential` lists a block's linear
layers in the order data flows through them (methods such as GPTQ quantize them in that order).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    blocks: str
    pre_block: tuple[str, ...]
    final_norm: str
    sequential: tuple[tuple[str, ...], ...]
    lm_head: str = "lm_head"


_LLAMA_SEQUENTIAL = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

FAMILIES: tuple[Family, ...] = (
    Family(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo", "olmo2"),
        blocks="model.layers",
        pre_block=("model.embed_tokens", "model.rotary_emb"),
        final_norm="model.norm",
        sequential=_LLAMA_SEQUENTIAL,
    ),
    Family(
        name="opt",
        model_types=("opt",),
        blocks="model.decoder.layers",
        pre_block=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
        final_norm="model.decoder.final_layer_norm",
        sequential=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
    ),
)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise LowbitError(
        f"architecture {model_type!r} is not supported yet. Supported model types: "
        f"{', '.join(supported_model_types())}. Adding a family is one entry in lowbit/model/architectures.py."
    )


def decoder_blocks(model: nn.Module, family: Family) -> nn.ModuleList:
    blocks = model.get_submodule(family.blocks)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise LowbitError(f"expected the decoder blocks at {family.blocks!r} in this {family.name} model; "
                          f"the installed transformers may lay it out differently.")
    return blocks


def optional_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
