"""Where each architecture family keeps its decoder blocks, embeddings, final norm and linear layers.

Architecture knowledge is data: supporting a new family is one `Family` entry in `FAMILIES`, not a new code
path. Paths are dotted module names inside the `*ForCausalLM` model; inside a block they are relative to it:
- `sequential` lists a block's linear layers in the order data flows through them (GPTQ quantizes them in
  that order);
- `parts` names the groups of linear layers that `--parts` selects (mlp, qkv, o_proj);
- `scaling` lists where a per-input-channel scale can be folded into the operation that produces a group's input
  (AWQ, SmoothQuant): the layers, the operation before them, and the module whose output the search compares.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class ScaleGroup:
    """Layers that read one tensor produced by `prev` (a norm, or a linear layer whose output reaches them
    through element-wise operations only). Dividing prev's output channel j by s_j and multiplying column j of
    each layer by s_j leaves the float model unchanged. `inspect` is the module whose output AWQ's scale search
    compares against the float one."""

    prev: str
    layers: tuple[str, ...]
    inspect: str


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    blocks: str
    pre_block: tuple[str, ...]
    final_norm: str
    sequential: tuple[tuple[str, ...], ...]
    parts: tuple[tuple[str, tuple[str, ...]], ...] = ()
    scaling: tuple[ScaleGroup, ...] = ()
    lm_head: str = "lm_head"

    def part_layers(self, part: str) -> tuple[str, ...]:
        return dict(self.parts).get(part, ())


_LLAMA_SEQUENTIAL = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_LLAMA_PARTS = (
    ("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("o_proj", ("self_attn.o_proj",)),
    ("mlp", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
)
_LLAMA_SCALING = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)

FAMILIES: tuple[Family, ...] = (
    Family(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "granite", "olmo"),
        blocks="model.layers",
        pre_block=("model.embed_tokens", "model.rotary_emb"),
        final_norm="model.norm",
        sequential=_LLAMA_SEQUENTIAL,
        parts=_LLAMA_PARTS,
        scaling=_LLAMA_SCALING,
    ),
    # Llama's layout, but a norm's weight is not a plain per-channel factor (Gemma's 1 + w) or the norms sit
    # after the sub-layers (Gemma 2, OLMo 2): no scaling groups yet.
    Family(
        name="llama-norm-variant",
        model_types=("gemma", "gemma2", "olmo2"),
        blocks="model.layers",
        pre_block=("model.embed_tokens", "model.rotary_emb"),
        final_norm="model.norm",
        sequential=_LLAMA_SEQUENTIAL,
        parts=_LLAMA_PARTS,
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
        parts=(
            ("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("o_proj", ("self_attn.out_proj",)),
            ("mlp", ("fc1", "fc2")),
        ),
        scaling=(
            ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                       "self_attn"),
            ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
            ScaleGroup("final_layer_norm", ("fc1",), "fc1"),
            ScaleGroup("fc1", ("fc2",), "fc2"),  # through ReLU: relu(x / s) = relu(x) / s for s > 0
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
