"""compressed-tensors: the checkpoint format vLLM, SGLang and transformers load (what llm-compressor writes).

Export maps each lowbit layer format onto a compressed-tensors scheme and lets the `compressed-tensors` package's
own compressors write the tensors and its config classes write `quantization_config`:

- integer weights, 4 or 8 bits, 16-bit activations → `pack-quantized` (`weight_packed` int32, 32 codes in b words,
  stored as q + 2^(b−1); `weight_scale`; `weight_zero_point` packed along the output dimension when asymmetric;
  `weight_shape`). lowbit's codes c are exactly those stored values: q = c − 2^(b−1), zp = z − 2^(b−1).
- int8 weights with int8 activations → `int-quantized` (`weight` int8, `weight_scale`, static `input_scale`);
- fp8 → `float-quantized` (`weight` e4m3, `weight_scale`, static `input_scale`);
- a static fp8 KV cache → `kv_cache_scheme` with `k_scale` / `v_scale` on each attention module.

Both convert ŵ = (q − zp)·s, so the decompressed weights are lowbit's own, bit for bit. What the schema (or a
serving engine) cannot express is refused before anything is written (`UnsupportedExport`).

Import reads such a directory (lowbit's or llm-compressor's) back into lowbit's packed runtime (QuantLinear).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import FP8Format, IntFormat, PerChannel, PerGroup, PerTensor, QuantizedWeight
from lowbit.formats.activation import ActFormat
from lowbit.formats.spec import LayerSpec
from lowbit.formats.spqr import SpQRFormat

# The compressed-tensors releases whose format lowbit writes and reads (tests run against the lower bound).
SUPPORTED = ((0, 20), (0, 20))
FORMAT_PACKED, FORMAT_INT, FORMAT_FLOAT = "pack-quantized", "int-quantized", "float-quantized"
SERVED_WEIGHT_BITS = (4, 8)


class UnsupportedExport(LowbitError):
    """A lowbit format that compressed-tensors (or the engines reading it) cannot express."""


def _ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise LowbitError("the compressed-tensors package is missing: `pip install 'compressed-tensors>=0.20,<0.21'` "
                          "(lowbit's set-up installs it).") from None
    from compressed_tensors import quantization

    return quantization


def check_version(version: str | None, where: str) -> None:
    """Refuse a compressed-tensors config written by a release newer than the ones lowbit knows."""
    if not version:
        return
    m = re.match(r"(\d+)\.(\d+)", str(version))
    if m is None:
        raise LowbitError(f"{where}: compressed-tensors version {version!r} is not a version number.")
    if (int(m.group(1)), int(m.group(2))) > SUPPORTED[1]:
        lo, hi = ".".join(map(str, SUPPORTED[0])), ".".join(map(str, SUPPORTED[1]))
        raise LowbitError(f"{where} was written by compressed-tensors {version}, newer than the releases this lowbit "
                          f"reads ({lo} to {hi}.x); its layout may have changed. Upgrade lowbit, or re-save the model "
                          f"with compressed-tensors {hi}.")


# --- lowbit format -> compressed-tensors scheme ------------------------------------------------------------------


@dataclass(frozen=True)
class Mapped:
    """A layer's compressed-tensors form: its storage format and the scheme's arguments (as plain dicts)."""

    format: str
    weights: tuple
    input_activations: tuple | None

    def scheme(self, targets: list[str]):
        q = _ct()
        return q.QuantizationScheme(
            targets=targets, weights=q.QuantizationArgs(**dict(self.weights)),
            input_activations=None if self.input_activations is None
            else q.QuantizationArgs(**dict(self.input_activations)), format=self.format)


def _strategy(granularity) -> dict:
    if isinstance(granularity, PerGroup):
        return {"strategy": "group", "group_size": granularity.size}
    if isinstance(granularity, PerChannel):
        return {"strategy": "channel"}
    return {"strategy": "tensor"}


def _act_args(act: ActFormat) -> dict:
    return {"num_bits": 8, "type": "float" if act.kind == "fp8" else "int", "symmetric": True,
            "strategy": act.granularity, "dynamic": not act.static}


def map_spec(name: str, spec: LayerSpec, act_order: bool = False) -> Mapped:
    """The compressed-tensors form of one layer, or UnsupportedExport naming the reason and the nearest choice."""
    w, act = spec.weight, spec.act
    where = f"layer {name}"
    if isinstance(w, SpQRFormat):
        raise UnsupportedExport(f"{where} is SpQR: compressed-tensors has no place for its sparse outliers and "
                                f"quantized second-level statistics; the nearest exportable choice is --method gptq "
                                f"--scheme w{w.bits}a16 --group-size 16 --asym.")
    if act is not None and act.granularity == "tensor" and not act.static:
        raise UnsupportedExport(f"{where} quantizes activations with a dynamic per-tensor scale (SmoothQuant O2), "
                                f"which vLLM has no kernel for; use per-token dynamic scales (--preset smoothquant-o1) "
                                f"or static per-tensor ones (--preset smoothquant-o3).")
    if isinstance(w, FP8Format):
        if act is not None and act.kind != "fp8":
            raise UnsupportedExport(f"{where} mixes fp8 weights with {act.kind} activations; use --scheme fp8.")
        weights = {"num_bits": 8, "type": "float", "symmetric": True, **_strategy(w.granularity)}
        return Mapped(FORMAT_FLOAT, tuple(weights.items()), None if act is None else tuple(_act_args(act).items()))
    assert isinstance(w, IntFormat)
    if w.float_zero:
        raise UnsupportedExport(f"{where} has float zero points (llama.cpp Q4_1 style, ŵ = c·s + m); "
                                f"compressed-tensors stores integer zero points only: the nearest exportable choice "
                                f"is --zero-point int.")
    if w.g_idx:
        raise UnsupportedExport(f"{where} has act-order groups given by a column map (g_idx), which "
                                f"compressed-tensors 0.20 no longer stores; the nearest exportable choice is "
                                f"re-quantizing with lowbit's --method gptq --act-order (static groups).")
    if w.bits not in SERVED_WEIGHT_BITS:
        raise UnsupportedExport(f"{where} has {w.bits}-bit weights, for which vLLM has no compressed-tensors kernel "
                                f"(it serves 4 and 8 bits); the nearest exportable choice is "
                                f"--scheme w{4 if w.bits < 4 else 8}a16.")
    weights = {"num_bits": w.bits, "type": "int", "symmetric": w.symmetric, **_strategy(w.granularity)}
    if act_order and isinstance(w.granularity, PerGroup):
        weights["actorder"] = "static"  # GPTQ's order with groups in column order: no g_idx is stored
    if act is None:
        return Mapped(FORMAT_PACKED, tuple(weights.items()), None)
    if act.kind != "int8" or w.bits != 8:
        raise UnsupportedExport(f"{where} mixes int{w.bits} weights with {act.kind} activations; use --scheme w8a8 "
                                f"or --scheme fp8.")
    if not w.symmetric or isinstance(w.granularity, PerGroup):
        raise UnsupportedExport(f"{where}: vLLM's int8 W8A8 kernels take symmetric weights with one scale per output "
                                f"channel or tensor; drop --asym / --group-size (w8a8 defaults to per channel).")
    return Mapped(FORMAT_INT, tuple(weights.items()), tuple(_act_args(act).items()))


# --- tensors ----------------------------------------------------------------------------------------------------


def _ct_scale(scale: torch.Tensor, granularity) -> torch.Tensor:
    return scale.reshape(1) if isinstance(granularity, PerTensor) else scale


def layer_state(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The uncompressed per-layer state a compressed-tensors compressor takes: ŵ, scale and zero point."""
    fmt = qw.fmt
    state = {"weight": qw.dequantize(), "weight_scale": _ct_scale(qw.scale, fmt.granularity)}
    if isinstance(fmt, IntFormat) and not fmt.symmetric:
        state["weight_zero_point"] = (qw.zero.to(torch.int16) - 2 ** (fmt.bits - 1)).to(torch.int8)
    return state


def compress_layer(qw: QuantizedWeight, mapped: Mapped, name: str) -> dict[str, torch.Tensor]:
    """The layer's stored tensors, written by compressed-tensors' own compressor and checked against lowbit's codes."""
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry(mapped.format)
    out = compressor.compress(layer_state(qw), mapped.scheme([name]))
    if not torch.equal(stored_codes(out, mapped.format, qw.fmt.bits), qw.codes):
        raise LowbitError(f"internal error: compressed-tensors' codes for {name} differ from lowbit's; nothing was "
                          f"written. Please report this with your compressed-tensors version.")
    return out


def stored_codes(tensors: dict[str, torch.Tensor], fmt: str, bits: int) -> torch.Tensor:
    """lowbit's codes (uint8 c = q + 2^(b−1), or e4m3) from a compressed layer's tensors."""
    if fmt == FORMAT_FLOAT:
        return tensors["weight"]
    if fmt == FORMAT_INT:
        return (tensors["weight"].to(torch.int16) + 128).to(torch.uint8)
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    shape = torch.Size(tensors["weight_shape"].tolist())
    q = unpack_from_int32(tensors["weight_packed"], bits, shape)
    return (q.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8)


# --- the quantization_config -------------------------------------------------------------------------------------


def build_config(layers: dict[str, Mapped], linear_names: list[str], kv_cache: bool) -> dict:
    """quantization_config for config.json: one config group per distinct scheme, unquantized linears ignored.

    When every quantized layer shares one scheme the group targets the class `Linear` (as llm-compressor writes
    it); mixed recipes list each group's layers by name.
    """
    q = _ct()
    by_scheme: dict[Mapped, list[str]] = defaultdict(list)
    for name, m in layers.items():
        by_scheme[m].append(name)
    ordered = sorted(by_scheme.items(), key=lambda kv: -len(kv[1]))
    uniform = len(ordered) == 1
    groups = {f"group_{i}": m.scheme(["Linear"] if uniform else names) for i, (m, names) in enumerate(ordered)}
    formats = {m.format for m in by_scheme}
    kv = q.QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor", dynamic=False) \
        if kv_cache else None
    config = q.QuantizationConfig(
        config_groups=groups, format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed", kv_cache_scheme=kv,
        ignore=[n for n in linear_names if n not in layers])
    from compressed_tensors import __version__ as ct_version

    return {"version": ct_version, "quant_method": "compressed-tensors", "sparsity_config": {},
            "transform_config": {}, **config.model_dump(exclude=["quant_method"])}


def export_tensors(model: nn.Module, layers: dict[str, Mapped], dtype: torch.dtype,
                   kv_scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of the exported checkpoint: compressed layers, other tensors in `dtype`, KV scales."""
    from lowbit.io.checkpoint import is_packed, quantized_layers, storage_state_dict

    tensors, _ = storage_state_dict(model, dtype)  # biases of quantized layers are cast there too
    qlayers = quantized_layers(model)
    qprefixes = tuple(n + "." for n in qlayers)
    out = {k: v for k, v in tensors.items() if not is_packed(k, qprefixes) and k not in kv_scales}
    for name, m in qlayers.items():
        for key, t in compress_layer(m.quantized_weight(), layers[name], name).items():
            out[f"{name}.{key}"] = t.contiguous()
        if m.input_scale is not None:
            out[f"{name}.input_scale"] = m.input_scale.detach().float().reshape(1).clone()
    for key, t in kv_scales.items():  # compressed-tensors keeps static scales as float32 [1]
        out[key] = t.detach().float().reshape(1).clone()
    return out


def shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split tensors into shards of at most max_bytes (a tensor larger than that gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    return shards


def write_safetensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors with transformers' index file."""
    from safetensors.torch import save_file

    parts = shard(tensors, max_shard_bytes)
    if len(parts) == 1:
        save_file(parts[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, part in enumerate(parts, 1):
        fname = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        save_file(part, str(directory / fname), metadata={"format": "pt"})
        names.append(fname)
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return names


# --- reading ----------------------------------------------------------------------------------------------------


def _matches(name: str, targets: list[str]) -> bool:
    """compressed-tensors' target rule for linear layers: a module name, `re:` + a regex, or the class `Linear`."""
    for t in targets:
        if t == "Linear" or t == name or (t.startswith("re:") and re.match(t[3:], name)):
            return True
    return False


def _granularity(args) -> PerTensor | PerChannel | PerGroup:
    if args.strategy == "group":
        return PerGroup(int(args.group_size))
    if args.strategy == "channel":
        return PerChannel()
    if args.strategy == "tensor":
        return PerTensor()
    raise LowbitError(f"compressed-tensors weight strategy {args.strategy!r} cannot be read by lowbit yet (it reads "
                      f"tensor, channel and group).")


def _read_layer(name: str, scheme, fmt: str, t: dict[str, torch.Tensor]) -> tuple[QuantizedWeight, LayerSpec]:
    w = scheme.weights
    gran = _granularity(w)
    scale = t["weight_scale"]
    scale = scale.reshape(1, 1) if isinstance(gran, PerTensor) else scale
    act = scheme.input_activations
    act_fmt = None
    if act is not None:
        if act.num_bits != 8 or act.strategy not in ("token", "tensor") or not act.symmetric:
            raise LowbitError(f"{name}: input activations {act.type}{act.num_bits} {act.strategy} cannot be read by "
                              f"lowbit (it reads symmetric 8-bit per-token or per-tensor activations).")
        act_fmt = ActFormat("fp8" if act.type == "float" else "int8", act.strategy, not act.dynamic)
    if w.type == "float":
        if w.num_bits != 8 or fmt != FORMAT_FLOAT:
            raise LowbitError(f"{name}: float{w.num_bits} weights stored as {fmt} cannot be read by lowbit (it reads "
                              f"fp8 e4m3 float-quantized weights).")
        return QuantizedWeight(FP8Format(gran), t["weight"], scale), LayerSpec(FP8Format(gran), act_fmt)
    ifmt = IntFormat(w.num_bits, bool(w.symmetric), gran)
    if fmt == FORMAT_PACKED:
        codes = stored_codes(t, fmt, w.num_bits)
    elif fmt in (FORMAT_INT, "naive-quantized") and w.num_bits == 8:
        codes = stored_codes(t, FORMAT_INT, 8)
    else:
        raise LowbitError(f"{name}: int{w.num_bits} weights stored as {fmt!r} cannot be read by lowbit (it reads "
                          f"pack-quantized and int-quantized).")
    zero = None
    if not w.symmetric:
        zp = t["weight_zero_point"]
        if fmt == FORMAT_PACKED:
            from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

            zp = unpack_from_int32(zp, w.num_bits, torch.Size(scale.shape), packed_dim=0)
        zero = (zp.reshape(scale.shape).to(torch.int16) + 2 ** (w.num_bits - 1)).to(torch.uint8)
    return QuantizedWeight(ifmt, codes, scale, zero), LayerSpec(ifmt, act_fmt)


def read_layers(qconfig: dict, tensors: dict[str, torch.Tensor], where: str) -> tuple[dict, dict]:
    """Quantized layers {name: (QuantizedWeight, LayerSpec, input_scale | None)} and static KV scales
    {attention module: (k_scale, v_scale)} of a compressed-tensors checkpoint; their tensors are taken out of
    `tensors`, so what is left are the model's plain tensors."""
    check_version(qconfig.get("version"), where)
    q = _ct()
    try:
        config = q.QuantizationConfig.model_validate({k: v for k, v in qconfig.items() if k in
                                                      q.QuantizationConfig.model_fields})
    except Exception as e:  # pydantic's ValidationError, or a removed option such as actorder="group"
        raise LowbitError(f"{where}: its compressed-tensors quantization_config cannot be read: "
                          f"{str(e).splitlines()[0]}") from None
    if config.quantization_status != "compressed":
        raise LowbitError(f"{where}: quantization_status is {config.quantization_status!r}; lowbit reads compressed "
                          f"checkpoints (the ones llm-compressor saves with save_compressed=True).")
    prefixes = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")})
    layers = {}
    for name in prefixes:
        if _matches(name, config.ignore or []):
            continue
        groups = [s for s in config.config_groups.values() if _matches(name, s.targets)]
        if not groups:
            raise LowbitError(f"{where}: layer {name} has quantized tensors but no config group targets it.")
        scheme = groups[-1]
        local = {k[len(name) + 1:]: tensors.pop(k) for k in [k for k in tensors if k.startswith(name + ".")]}
        qw, spec = _read_layer(name, scheme, scheme.format or config.format, local)
        layers[name] = (qw, spec, local.get("bias"), local.get("input_scale"))
    kv = {}
    if config.kv_cache_scheme is not None:
        args = config.kv_cache_scheme
        if args.type != "float" or args.num_bits != 8 or args.strategy != "tensor" or args.dynamic:
            raise LowbitError(f"{where}: KV-cache scheme {args.type}{args.num_bits} {args.strategy} "
                              f"{'dynamic' if args.dynamic else 'static'} cannot be read by lowbit (it reads static "
                              f"per-tensor fp8 k_scale / v_scale).")
        for key in [k for k in tensors if k.endswith(".k_scale")]:
            attn = key[: -len(".k_scale")]
            kv[attn] = (tensors.pop(key).float().reshape(()), tensors.pop(f"{attn}.v_scale").float().reshape(()))
    return layers, kv
