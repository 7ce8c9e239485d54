"""Readers for the GPTQ (AutoGPTQ / GPTQModel) and AWQ (AutoAWQ GEMM) checkpoint layouts.

Both store, per linear layer, b-bit codes packed into int32 words, float16 scales and packed integer zero points,
and dequantize ŵ = (c − z)·s, transposed against torch's [out, in]:

- GPTQ: `qweight` [in·b/32, out], codes packed along the input dimension as one little-endian bit stream per 32
  inputs (the layout of lowbit's own packing, so 3-bit codes straddle words the same way); `qzeros`
  [groups, out·b/32] packed along the output dimension; `scales` [groups, out]; `g_idx` [in], the group of each
  input column (act-order checkpoints permute it). "gptq_v2" stores z; the original format ("gptq", v1) stores the
  packed zeros minus 0x11…1 as one 32-bit subtraction (GPTQModel), so a zero of 0 borrows from its neighbour; 3-bit
  fields, which straddle words, are decremented one by one (modulo 8).
- AWQ GEMM: `qweight` [in, out/8] and `qzeros` [groups, out/8], eight 4-bit codes per word along the output
  dimension in the interleaved order 0, 2, 4, 6, 1, 3, 5, 7 (nibble i holds column ORDER[i] of its block of
  eight); `scales` [groups, out]; z is stored as is.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.formats import IntFormat, PerChannel, PerGroup, QuantizedWeight
from lowbit.formats.packing import unpack
from lowbit.formats.spec import LayerSpec

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _layers(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".qweight")})


def _take(tensors: dict[str, torch.Tensor], name: str, keys: tuple[str, ...], where: str) -> dict[str, torch.Tensor]:
    missing = [k for k in keys if f"{name}.{k}" not in tensors]
    if missing:
        raise LowbitError(f"{where}: layer {name} lacks {', '.join(missing)}; the checkpoint is incomplete.")
    local = {k: tensors.pop(f"{name}.{k}") for k in keys}
    for extra in ("bias", "g_idx"):
        if f"{name}.{extra}" in tensors:
            local[extra] = tensors.pop(f"{name}.{extra}")
    return local


def _format(bits: int, group_size: int, in_features: int, symmetric: bool, g_idx: bool) -> IntFormat:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise LowbitError(f"{bits}-bit weights cannot be read by lowbit (2 to 8 bits).")
    gran = PerChannel() if group_size in (-1, 0, None) or group_size >= in_features else PerGroup(int(group_size))
    return IntFormat(bits, symmetric, gran, g_idx=g_idx and isinstance(gran, PerGroup))


def _weight(codes, scale, zero, bits, group_size, sym_claimed, g_idx) -> tuple[QuantizedWeight, LayerSpec]:
    """A QuantizedWeight in lowbit's orientation; symmetric when every zero point is the grid's middle."""
    in_f = codes.shape[1]
    mid = 2 ** (bits - 1)
    symmetric = sym_claimed and bool((zero == mid).all())
    plain = g_idx is None or torch.equal(g_idx.long(), torch.arange(in_f) // max(group_size, 1))
    fmt = _format(bits, group_size, in_f, symmetric, g_idx is not None and not plain)
    zero = zero.to(torch.uint8)
    qw = QuantizedWeight(fmt, codes, scale, None if symmetric else zero,
                         g_idx.to(torch.int32) if fmt.g_idx else None)
    return qw, LayerSpec(fmt)


def read_gptq(qconfig: dict, tensors: dict[str, torch.Tensor], where: str) -> tuple[dict, dict]:
    """Quantized layers {name: (QuantizedWeight, LayerSpec, bias, None)} of a GPTQ-format checkpoint."""
    bits, group_size = int(qconfig.get("bits", 4)), int(qconfig.get("group_size", 128))
    fmt_name = qconfig.get("checkpoint_format", qconfig.get("format", "gptq"))
    if fmt_name not in ("gptq", "gptq_v2"):
        raise LowbitError(f"{where}: GPTQ checkpoint_format {fmt_name!r} cannot be read by lowbit (it reads gptq and "
                          f"gptq_v2; Marlin- or bitblas-repacked checkpoints are kernel layouts).")
    layers = {}
    for name in _layers(tensors):
        t = _take(tensors, name, ("qweight", "qzeros", "scales"), where)
        scale = t["scales"].t().contiguous()
        groups, out_f = t["scales"].shape
        in_f = t["qweight"].shape[0] * 32 // bits
        codes = unpack(t["qweight"].t().contiguous(), bits, in_f)
        v1 = fmt_name == "gptq"  # v1 stores z − 1: 2/4/8 bits as one 32-bit subtraction, 3 bits field by field
        qzeros = _add_ones(t["qzeros"], bits) if v1 and 32 % bits == 0 else t["qzeros"]
        zero = unpack(qzeros, bits, out_f).t().to(torch.int16)
        if v1 and 32 % bits:
            zero = (zero + 1) % 2**bits
        size = in_f // groups if group_size in (-1, 0) else group_size
        g_idx = t.get("g_idx")
        qw, spec = _weight(codes, scale, zero, bits, size if groups > 1 else -1, bool(qconfig.get("sym", True)),
                           g_idx if groups > 1 else None)
        layers[name] = (qw, spec, t.get("bias"), None)
    return layers, {}


def _add_ones(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Add 1 to every b-bit field of the words as one 32-bit addition: the inverse of GPTQ v1's subtraction, carries
    included (b divides 32)."""
    ones = sum(1 << (bits * j) for j in range(32 // bits))
    w = (words.to(torch.int64) + ones) & 0xFFFFFFFF
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def read_awq(qconfig: dict, tensors: dict[str, torch.Tensor], where: str) -> tuple[dict, dict]:
    """Quantized layers {name: (QuantizedWeight, LayerSpec, bias, None)} of an AutoAWQ GEMM checkpoint."""
    bits = int(qconfig.get("bits", qconfig.get("w_bit", 4)))
    version = str(qconfig.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm":
        raise LowbitError(f"{where}: AWQ {version} with {bits}-bit weights cannot be read by lowbit (it reads the "
                          f"4-bit GEMM layout).")
    if not qconfig.get("zero_point", True):
        raise LowbitError(f"{where}: AWQ without zero points cannot be read by lowbit (AutoAWQ's GEMM layout has "
                          f"them).")
    order = torch.tensor(AWQ_ORDER)
    layers = {}
    for name in _layers(tensors):
        t = _take(tensors, name, ("qweight", "qzeros", "scales"), where)
        codes = _unpack_awq(t["qweight"], order)  # [in, out]
        zero = _unpack_awq(t["qzeros"], order)  # [groups, out]
        groups = t["scales"].shape[0]
        qw, spec = _weight(codes.t().contiguous(), t["scales"].t().contiguous(), zero.t().to(torch.int16), bits,
                           codes.shape[0] // groups if groups > 1 else -1, False, None)
        layers[name] = (qw, spec, t.get("bias"), None)
    return layers, {}


def _unpack_awq(words: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """[rows, cols/8] int32 → [rows, cols] uint8 codes: nibble i of word j is column 8j + order[i]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(w >> (4 * i)) & 0xF for i in range(8)], dim=-1)  # [rows, cols/8, 8]: nibble i
    cols = torch.empty_like(nibbles)
    cols[..., order] = nibbles
    return cols.reshape(words.shape[0], -1).to(torch.uint8)
