"""Where each architecture family keeps its decoder blocks, embeddings, final norm and linear layers.

Architecture knowledge is data: supporting a new family is one `Family` entry in `FAMILIES`, not a new code
path. Paths are dotted module names inside the `*ForCausalLM` model; inside a block they are relative to it:
- `sequential` lists a block's linear layers in the order data flows through them (GPTQ quantizes them in
  that order);
- `parts` names the groups of linear layers that `--parts` selects (mlp, qkv, o_proj);
- `scaling` lists where a per-input-channel scale can be folded into the operation that produces a group's input
  (AWQ, SmoothQuant): the layers, the operation before them, and the module whose output the search compares;
- `keep` names linear layers that stay in 16 bits whatever the recipe says (mixture-of-experts routers).

A `*` in a name stands for an index (the experts of a mixture-of-experts block, `mlp.experts.*.gate_proj`); a scaling
group whose `prev` has one is repeated for each index (one group per expert).
"""

from __future__ import annotations

import re
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
    prev_offset: float = 0.0  # prev is a norm whose output is x̂·(offset + w): Gemma's 1 + w
    prev_chunk: tuple[int, int] | None = None  # (k, n): the layers read chunk k of n of prev's output (fused q/k/v)


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
    keep: tuple[str, ...] = ()

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

_GEMMA_NORMS = dict(prev_offset=1.0)  # Gemma's RMSNorm scales by 1 + w
_POST_NORM_SCALING = (  # Gemma 2/3: a norm before and after each sub-layer; the pre-norms feed the groups
    ScaleGroup("input_layernorm", _LLAMA_PARTS[0][1], "self_attn", **_GEMMA_NORMS),
    _LLAMA_SCALING[1],
    ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", **_GEMMA_NORMS),
    _LLAMA_SCALING[3],
)
_MOE_MLP = ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.shared_expert.gate_proj",
            "mlp.shared_expert.up_proj", "mlp.gate_proj", "mlp.up_proj")  # the last: Qwen3-MoE's dense blocks
_MOE_DOWN = ("mlp.experts.*.down_proj", "mlp.shared_expert.down_proj", "mlp.down_proj")


def _llama_like(name: str, model_types: tuple[str, ...], blocks: str = "model.layers", **kw) -> Family:
    root = blocks.rpartition(".")[0]
    defaults = dict(pre_block=(f"{root}.embed_tokens", f"{root}.rotary_emb"), final_norm=f"{root}.norm",
                    sequential=_LLAMA_SEQUENTIAL, parts=_LLAMA_PARTS, scaling=_LLAMA_SCALING)
    return Family(name=name, model_types=model_types, blocks=blocks, **(defaults | kw))


FAMILIES: tuple[Family, ...] = (
    _llama_like("llama", ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo")),
    _llama_like("gemma", ("gemma",), scaling=(
        ScaleGroup("input_layernorm", _LLAMA_PARTS[0][1], "self_attn", **_GEMMA_NORMS),
        _LLAMA_SCALING[1],
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", **_GEMMA_NORMS),
        _LLAMA_SCALING[3],
    )),
    _llama_like("gemma2", ("gemma2", "gemma3_text"), scaling=_POST_NORM_SCALING),
    # Gemma 3 image-text checkpoints: the language model's blocks; the vision tower and projector stay in 16 bits
    _llama_like("gemma3", ("gemma3",), blocks="model.language_model.layers", scaling=_POST_NORM_SCALING),
    # OLMo 2 normalizes sub-layer outputs only: q/k/v and gate/up read the raw residual stream, which no
    # operation before them can rescale; only v→o and up→down take scales.
    _llama_like("olmo2", ("olmo2",), scaling=(_LLAMA_SCALING[1], _LLAMA_SCALING[3])),
    # Phi-3/4 store q/k/v as one qkv_proj and gate/up as one gate_up_proj ([gate; up] rows): they are quantized as
    # stored; v is qkv_proj's last third (without grouped-query attention) and up gate_up_proj's second half.
    _llama_like(
        "phi3", ("phi3",),
        sequential=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
        parts=(("qkv", ("self_attn.qkv_proj",)), ("o_proj", ("self_attn.o_proj",)),
               ("mlp", ("mlp.gate_up_proj", "mlp.down_proj"))),
        scaling=(
            ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
            ScaleGroup("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj", prev_chunk=(2, 3)),
            ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
            ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", prev_chunk=(1, 2)),
        ),
    ),
    # Mixture of experts: transformers' fused expert tensors become one linear layer per expert on loading
    # (lowbit.model.experts); each expert's statistics come from the tokens routed to it. Routers stay in 16 bits.
    _llama_like(
        "moe", ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"),
        sequential=(*_LLAMA_SEQUENTIAL[:2], _MOE_MLP, _MOE_DOWN),
        parts=(*_LLAMA_PARTS[:2], ("mlp", (*_MOE_MLP, *_MOE_DOWN))),
        scaling=(
            _LLAMA_SCALING[0],
            _LLAMA_SCALING[1],
            ScaleGroup("post_attention_layernorm", (*_MOE_MLP, "mlp.gate", "mlp.shared_expert_gate"), "mlp"),
            ScaleGroup("mlp.experts.*.up_proj", ("mlp.experts.*.down_proj",), "mlp.experts.*.down_proj"),
            ScaleGroup("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",), "mlp.shared_expert.down_proj"),
            _LLAMA_SCALING[3],
        ),
        keep=("mlp.gate", "mlp.shared_expert_gate"),
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
    # GPT-2's Conv1D layers (weights stored [in, out]) become nn.Linear on loading (lowbit.model.adapt). c_fc → c_proj
    # passes GELU, which does not commute with scaling: no group there.
    Family(
        name="gpt2",
        model_types=("gpt2",),
        blocks="transformer.h",
        pre_block=("transformer.wte", "transformer.wpe"),
        final_norm="transformer.ln_f",
        sequential=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        parts=(("qkv", ("attn.c_attn",)), ("o_proj", ("attn.c_proj",)), ("mlp", ("mlp.c_fc", "mlp.c_proj"))),
        scaling=(
            ScaleGroup("ln_1", ("attn.c_attn",), "attn"),
            ScaleGroup("attn.c_attn", ("attn.c_proj",), "attn.c_proj", prev_chunk=(2, 3)),
            ScaleGroup("ln_2", ("mlp.c_fc",), "mlp"),
        ),
    ),
)


def expand(patterns: tuple[str, ...] | list[str], names: list[str]) -> list[str]:
    """The names that match the patterns (`*` = one index), pattern by pattern, each in the order of `names`."""
    out: list[str] = []
    for pattern in patterns:
        rx = re.compile(re.escape(pattern).replace(r"\*", r"\d+"))
        out += [n for n in names if rx.fullmatch(n) and n not in out]
    return out


def families_markdown() -> str:
    """The README's list of supported families, from this table."""
    lines = []
    for f in FAMILIES:
        types = ", ".join(f"`{t}`" for t in f.model_types)
        scaled = ", ".join(dict.fromkeys(n for g in f.scaling for n in g.layers if n not in f.keep))
        lines.append(f"- **{f.name}**: {types}. AWQ/SmoothQuant scale the inputs of {scaled}.")
    return "\n".join(lines)


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


def text_config(model: nn.Module):
    """The configuration of the language model (an image-text model's `text_config`, else the config itself)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


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
