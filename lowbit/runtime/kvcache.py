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

With static scales (what vLLM reads from a compressed-tensors checkpoint: one `k_scale` and one `v_scale` per
attention module, calibrated once), keys and values are rounded with those instead: x̂ = e4m3(x / s)·s, s = max|x|
over the calibration set / 448. `calibrate_static_scales` measures them; they live as `k_scale` / `v_scale`
buffers on the attention modules, so a checkpoint keeps them.

`enable(model, kind, attention, static)` installs both on a model: a forward pre-hook hands the model a
QuantizedKVCache whenever it would otherwise run without a cache or with a fresh DynamicCache (generate()).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lowbit.errors import LowbitError
from lowbit.formats.activation import ACT_KINDS, QMAX, ActFormat, check_kv_kind, fake_quantize_activation


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
    """transformers' DynamicCache with every layer quantizing what it stores (see the module docstring); with
    `scales` ([(k_scale, v_scale)] per layer) the scales are static, else one per token and head."""

    def __init__(self, kind: str, scales: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        check_kv_kind(kind)
        super(DynamicCache, self).__init__(layer_class_to_replicate=DynamicLayer if scales else _LAYER_CLASSES[kind])
        self.kind, self.scales = kind, scales

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.scales is not None:
            k_scale, v_scale = self.scales[layer_idx]
            key_states = quantize_kv_static(key_states, self.kind, k_scale)
            value_states = quantize_kv_static(value_states, self.kind, v_scale)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def quantize_kv_static(x: torch.Tensor, kind: str, scale: torch.Tensor) -> torch.Tensor:
    """Round keys or values with one calibrated scale for the whole tensor."""
    return fake_quantize_activation(x, ActFormat(kind, "tensor", static=True), scale.to(x.device))


class _AmaxCache(DynamicCache):
    """A plain DynamicCache that records max |k| and max |v| per layer as they are stored."""

    def __init__(self, amax: dict[int, list[float]]) -> None:
        super().__init__()
        self.amax = amax

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        seen = self.amax.setdefault(layer_idx, [0.0, 0.0])
        seen[0] = max(seen[0], key_states.detach().abs().max().item())
        seen[1] = max(seen[1], value_states.detach().abs().max().item())
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@torch.no_grad()
def calibrate_static_scales(model: nn.Module, attention: list[nn.Module], kind: str, ids: torch.Tensor,
                            dtype: torch.dtype, batch: int = 8) -> None:
    """Set `k_scale` / `v_scale` buffers (float32 scalars, rounded through `dtype`, the checkpoint's) on each
    attention module from max |k|, max |v| over the calibration windows `ids` [n, seqlen], run through `model`."""
    check_kv_kind(kind)
    amax: dict[int, list[float]] = {}
    device = next(model.parameters()).device
    for chunk in ids.split(batch):
        model(input_ids=chunk.to(device), use_cache=True, **{cache_kwarg(model): _AmaxCache(amax)})
    if sorted(amax) != list(range(len(attention))):
        raise LowbitError(f"KV-cache calibration saw {len(amax)} cached layers for {len(attention)} attention "
                          f"modules; this architecture's cache is laid out differently.")
    for i, attn in enumerate(attention):
        for name, a in zip(("k_scale", "v_scale"), amax[i], strict=True):
            s = torch.tensor(a / QMAX[kind], dtype=torch.float32).clamp(min=torch.finfo(torch.float32).tiny)
            attn.register_buffer(name, s.to(dtype).float())


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


def cache_kwarg(model: nn.Module) -> str:
    """The name the model's forward takes its cache by: `cache` (transformers ≥ 5.24, which still accepts the old
    name with a deprecation warning) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_hook(kind: str, static: list[nn.Module] | None, name: str):
    def hook(_module, args, kwargs):
        given = [k for k in ("cache", "past_key_values") if kwargs.get(k) is not None]
        pkv = kwargs.pop(given[0]) if given else None
        fresh = pkv is None or (type(pkv) is DynamicCache and pkv.get_seq_length() == 0)
        if fresh:
            scales = [(a.k_scale, a.v_scale) for a in static] if static is not None else None
            pkv = QuantizedKVCache(kind, scales)
        kwargs[name] = pkv
        return args, kwargs

    return hook


def attention_modules(model: nn.Module, blocks: str) -> list[nn.Module]:
    """Each decoder block's attention module (`self_attn`), in layer order: where static KV scales live."""
    return [block.get_submodule("self_attn") for block in model.get_submodule(blocks)]


def enable(model: nn.Module, kind: str, attention: bool = False, static: list[nn.Module] | None = None) -> nn.Module:
    """Quantize the model's KV cache (and, with `attention`, its attention queries) from now on, in place.

    `static`: the attention modules, in layer order, whose `k_scale` / `v_scale` buffers hold static scales.
    """
    check_kv_kind(kind)
    if getattr(model, "lowbit_kv_cache", None) is not None:
        raise LowbitError("this model already quantizes its KV cache.")
    if static is not None and not all(hasattr(a, "k_scale") and hasattr(a, "v_scale") for a in static):
        raise LowbitError("static KV-cache scales were asked for but are not calibrated (no k_scale / v_scale).")
    model.register_forward_pre_hook(_cache_hook(kind, static, cache_kwarg(model)), with_kwargs=True)
    model.lowbit_kv_cache = kind
    if attention:
        model.config._attn_implementation = f"lowbit_q{kind}"
    return model
