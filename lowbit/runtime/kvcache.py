"""KV-cache quantization through transformers' cache interface, and quantized attention inputs.

Keys and values are quantized where they are stored: `QuantizedKVCache` is a `DynamicCache` whose layers
round every incoming key and value (after the rotary embedding) to int8 or fp8 E4M3 with one scale per token and
head (max |k| over the head dimension / 127 or 448), and keep the rounded values. Attention reads what the
cache returns, so every position — prompt and generated — attends to quantized keys and values, as a server with
a quantized cache computes it. Stored values are held dequantized (an exact emulation of the stored codes).

With the `attention` part, the attention product also takes quantized queries in prefill (same per-token,
per-head format; decode steps keep 16-bit queries), through an attention function registered with transformers'
AttentionInterface that rounds the queries and calls transformers' SDPA attention (whose masks it is registered
with). The softmax probabilities stay in 16 bits.

`enable(model, kind, attention)` installs both on a model: a forward pre-hook hands the model a
QuantizedKVCache whenever it would otherwise run without a cache or with a fresh DynamicCache (generate()).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lowbit.errors import LowbitError
from lowbit.formats.activation import ACT_KINDS, ActFormat, check_kv_kind, fake_quantize_activation


def quantize_kv(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Round keys or values [batch, heads, tokens, head_dim] with one scale per (batch, head, token)."""
    return fake_quantize_activation(x, ActFormat(kind, "token"))


class QuantizedKVLayer(DynamicLayer):
    """A DynamicLayer that stores (and so returns) its keys and values quantized."""

    kind = "int8"

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return super().update(quantize_kv(key_states, self.kind), quantize_kv(value_states, self.kind), *args,
                              **kwargs)


_LAYER_CLASSES = {kind: type(f"QuantizedKVLayer_{kind}", (QuantizedKVLayer,), {"kind": kind}) for kind in ACT_KINDS}


class QuantizedKVCache(DynamicCache):
    """transformers' DynamicCache with every layer quantizing what it stores (see the module docstring)."""

    def __init__(self, kind: str) -> None:
        check_kv_kind(kind)
        super(DynamicCache, self).__init__(layer_class_to_replicate=_LAYER_CLASSES[kind])
        self.kind = kind


def _quantized_query_attention(kind: str):
    """transformers' SDPA attention, on quantized queries in prefill (a pass over more than one new token).

    Decode steps (one query per sequence) keep 16-bit queries, as a server with quantized prefill attention
    does; a teacher-forced pass is one prefill, so every position of it takes quantized queries. The keys and
    values come quantized from the cache.
    """
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
        if query.shape[-2] > 1:
            query = quantize_kv(query, kind)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, *args, **kwargs)

    return attention


for _kind in ACT_KINDS:
    AttentionInterface.register(f"lowbit_q{_kind}", _quantized_query_attention(_kind))
    ALL_MASK_ATTENTION_FUNCTIONS.register(f"lowbit_q{_kind}", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _cache_hook(kind: str):
    def hook(_module, args, kwargs):
        pkv = kwargs.get("past_key_values")
        fresh = pkv is None or (type(pkv) is DynamicCache and pkv.get_seq_length() == 0)
        if fresh:
            kwargs["past_key_values"] = QuantizedKVCache(kind)
        return args, kwargs

    return hook


def enable(model: nn.Module, kind: str, attention: bool = False) -> nn.Module:
    """Quantize the model's KV cache (and, with `attention`, its attention queries) from now on, in place."""
    check_kv_kind(kind)
    if getattr(model, "lowbit_kv_cache", None) is not None:
        raise LowbitError("this model already quantizes its KV cache.")
    model.register_forward_pre_hook(_cache_hook(kind), with_kwargs=True)
    model.lowbit_kv_cache = kind
    if attention:
        model.config._attn_implementation = f"lowbit_q{kind}"
    return model
