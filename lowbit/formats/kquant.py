"""llama.cpp's k-quants (ggml's Q2_K … Q6_K) and IQ4_NL as lowbit weight formats, and their bytes.

A k-quant cuts each row into super-blocks of 256 columns and those into sub-blocks of 16 or 32. Every sub-block j
is an affine grid, ŵ = S_j·(c − o) − M_j, whose scale (and minimum) are themselves quantized to a few bits under
float16 super-block scales d and m: two-level statistics, as SpQR's (ggml-common.h block_q*_K; the
dequantization is ggml's, c the stored unsigned code):

    type    code   sub-blocks  S_j             M_j          o    sub-block statistics             block bytes  bits/w
    Q2_K    2-bit  16 × 16     d·a_j           m·b_j        0    a, b: 4-bit unsigned             84           2.625
    Q3_K    3-bit  16 × 16     d·(a_j − 32)    0            4    a: 6-bit, a − 32 signed          110          3.4375
    Q4_K    4-bit   8 × 32     d·a_j           m·b_j        0    a, b: 6-bit unsigned             144          4.5
    Q5_K    5-bit   8 × 32     d·a_j           m·b_j        0    a, b: 6-bit unsigned             176          5.5
    Q6_K    6-bit  16 × 16     d·a_j           0            32   a: int8                          210          6.5625
    IQ4_NL  4-bit  blocks of 32: ŵ = d·T[c], T llama.cpp's fixed non-uniform 16-value table       18           4.5

Round to nearest (`quantize_k`) follows llama.cpp's reference quantizers: each sub-block's (S, M) by a small search
of scales with a weighted least-squares fit (weights |x|-based, or with an importance vector a_i, a_i·√(σ² + x²)
as llama.cpp does with an imatrix), then the sub-block statistics quantized under the super-block's scales, then
every code re-rounded on the stored grid. `fit_superblock` / `round_column` give GPTQ the same grid one super-block
and one column at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.formats.packing import pack, unpack

IQ4_TABLE = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class KType:
    """One ggml type: code bits, columns per sub-block and per super-block, the sub-block statistics' bits, and
    whether sub-blocks store a minimum (else the grid is symmetric around code `offset`)."""

    name: str
    bits: int
    sub: int
    superblock: int
    stat_bits: int
    minimum: bool
    block_bytes: int

    @property
    def offset(self) -> int:
        return 0 if self.minimum else 1 << (self.bits - 1)

    @property
    def bits_per_weight(self) -> float:
        return self.block_bytes * 8 / self.superblock


KTYPES = {t.name: t for t in (
    KType("q2_k", 2, 16, 256, 4, True, 84), KType("q3_k", 3, 16, 256, 6, False, 110),
    KType("q4_k", 4, 32, 256, 6, True, 144), KType("q5_k", 5, 32, 256, 6, True, 176),
    KType("q6_k", 6, 16, 256, 8, False, 210), KType("iq4_nl", 4, 32, 32, 0, False, 18))}


@dataclass(frozen=True)
class KQuantFormat:
    """A llama.cpp k-quant or IQ4_NL weight format (`type`: q2_k … q6_k, iq4_nl)."""

    type: str
    kind = "ggml"

    def __post_init__(self) -> None:
        if self.type not in KTYPES:
            raise LowbitError(f"unknown llama.cpp type {self.type!r}: expected one of {', '.join(KTYPES)}.")

    @property
    def t(self) -> KType:
        return KTYPES[self.type]

    @property
    def bits(self) -> int:
        return self.t.bits

    @property
    def superblock(self) -> int:
        return self.t.superblock

    def to_dict(self) -> dict:
        return {"kind": "ggml", "type": self.type}

    @classmethod
    def from_dict(cls, d: dict) -> KQuantFormat:
        return cls(str(d["type"]))


@dataclass
class KQuantWeight:
    """Codes [out, in] (uint8) and the statistics: float16 d (and m) per super-block [out, in/256], the sub-block
    statistics a (and b) per sub-block [out, in/sub] (uint8; int8 for Q6_K); IQ4_NL has d per block only."""

    fmt: KQuantFormat
    codes: torch.Tensor
    stats: dict[str, torch.Tensor]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """ŵ in float32 [out, in], with ggml's operations in ggml's order (bit for bit its dequantization)."""
        t = self.fmt.t
        rows, cols = self.shape
        s, m = grid_of(t, self.stats)
        w = _values(self.codes.reshape(rows, -1, t.sub), t, s.unsqueeze(-1), None if m is None else m.unsqueeze(-1))
        return w.reshape(rows, cols)

    def packed(self) -> dict[str, torch.Tensor]:
        return {"qweight": pack(self.codes, self.fmt.bits), **{f"k_{k}": v for k, v in self.stats.items()}}

    @classmethod
    def from_packed(cls, fmt: KQuantFormat, shape: tuple[int, int], tensors: dict[str, torch.Tensor]) -> KQuantWeight:
        stats = {k[2:]: v for k, v in tensors.items() if k.startswith("k_")}
        return cls(fmt, unpack(tensors["qweight"], fmt.bits, shape[1]), stats)

    def stored_bits(self) -> int:
        return sum(t.numel() * t.element_size() * 8 for t in self.packed().values())

    def bits_per_weight(self) -> float:
        return self.stored_bits() / self.codes.numel()

    def split_rows(self, sizes: list[int]) -> list[KQuantWeight]:
        parts = {k: v.split(sizes) for k, v in self.stats.items()}
        return [KQuantWeight(self.fmt, c, {k: parts[k][i] for k in parts})
                for i, c in enumerate(self.codes.split(sizes))]


def packed_shapes(fmt: KQuantFormat, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    from lowbit.formats.packing import packed_length

    t = fmt.t
    rows, cols = shape
    out = {"qweight": ((rows, packed_length(cols, t.bits)), torch.int32),
           "k_d": ((rows, cols // t.superblock), torch.float16)}
    if t.name == "iq4_nl":
        return out
    out["k_a"] = ((rows, cols // t.sub), torch.int8 if t.name == "q6_k" else torch.uint8)
    if t.minimum:
        out["k_m"] = ((rows, cols // t.superblock), torch.float16)
        out["k_b"] = ((rows, cols // t.sub), torch.uint8)
    return out


def sub_grid(t: KType, stats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each sub-block's scale S and minimum M (float32 [rows, in/sub]; M None without minimums), as ggml forms them
    from the stored statistics."""
    per = t.superblock // t.sub
    d = stats["d"].float().repeat_interleave(per, dim=-1)
    a = stats["a"].float()
    if t.name == "q3_k":
        a = a - 32
    s = d * a
    if not t.minimum:
        return s, None
    return s, stats["m"].float().repeat_interleave(per, dim=-1) * stats["b"].float()


# --- round to nearest -------------------------------------------------------------------------------------------


def _fit_weights(x: torch.Tensor, t: KType, importance: torch.Tensor | None) -> torch.Tensor:
    """The per-weight importance of the sub-block fits: llama.cpp's defaults, or a_i·√(σ² + x²) with an importance
    vector (σ² = 2·mean x² of the super-block)."""
    if importance is not None:
        sigma2 = 2 * x.pow(2).mean(dim=(-2, -1), keepdim=True)
        return importance * (sigma2 + x.pow(2)).sqrt()
    if t.minimum and t.sub == 32:
        return x.pow(2).mean(-1, keepdim=True).sqrt() + x.abs()
    if t.minimum:
        return x.abs()
    return x.pow(2)


def _fit_minimum(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                 nstep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale s ≥ 0 and minimum m ≥ 0 (ŵ = s·L − m, L ∈ [0, nmax]) per sub-block of x [..., sub], minimizing the
    w-weighted squared error over llama.cpp's candidate scales (each refit by weighted least squares)."""
    lo = x.amin(-1).clamp(max=0)
    hi = x.amax(-1)
    rng = (hi - lo).clamp(min=1e-30)
    best_s, best_m = rng / nmax, lo
    L = ((x - lo.unsqueeze(-1)) / best_s.unsqueeze(-1)).round().clamp(0, nmax)
    best_e = (w * (best_s.unsqueeze(-1) * L + lo.unsqueeze(-1) - x).pow(2)).sum(-1)
    sw, swx = w.sum(-1), (w * x).sum(-1)
    for i in range(nstep + 1):
        iscale = (rmin + rdelta * i + nmax) / rng
        L = (iscale.unsqueeze(-1) * (x - lo.unsqueeze(-1))).round().clamp(0, nmax)
        swl, swl2, swlx = (w * L).sum(-1), (w * L * L).sum(-1), (w * L * x).sum(-1)
        det = sw * swl2 - swl * swl
        ok = det > 0
        s = torch.where(ok, (sw * swlx - swx * swl) / det.clamp(min=1e-30), best_s)
        m = torch.where(ok, (swl2 * swx - swl * swlx) / det.clamp(min=1e-30), best_m)
        pos = m > 0  # the minimum stays ≤ 0 (stored as −m ≥ 0); refit the scale alone
        s = torch.where(pos, swlx / swl2.clamp(min=1e-30), s)
        m = torch.where(pos, torch.zeros_like(m), m)
        e = (w * (s.unsqueeze(-1) * L + m.unsqueeze(-1) - x).pow(2)).sum(-1)
        better = ok & (e < best_e) & (s > 0)
        best_s, best_m, best_e = torch.where(better, s, best_s), torch.where(better, m, best_m), \
            torch.where(better, e, best_e)
    flat = hi <= lo
    return torch.where(flat, torch.zeros_like(best_s), best_s), (-best_m).clamp(min=0)


def _fit_symmetric(x: torch.Tensor, w: torch.Tensor, nmax: int) -> torch.Tensor:
    """Signed scale s per sub-block (ŵ = s·L, L ∈ [−nmax, nmax − 1]) over llama.cpp's candidates
    −(nmax + 0.1·k)/x_max, k = −9 … 9."""
    return _best_scale(x, w, [-(nmax + 0.1 * k) for k in range(-9, 10)],
                       lambda v: v.round().clamp(-nmax, nmax - 1))


def _best_scale(x: torch.Tensor, w: torch.Tensor, numerators: list[float], levels) -> torch.Tensor:
    """The scale s (ŵ = s·L) with the least w-weighted error among the candidates: for each inverse scale
    numerator/x_max (x_max the signed weight of largest magnitude), L = levels(inverse·x) and s refit to those
    levels by weighted least squares. All-zero sub-blocks get s = 0."""
    xmax = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
    safe = torch.where(xmax == 0, torch.ones_like(xmax), xmax)
    best_s = torch.zeros_like(xmax)
    best_e = (w * x * x).sum(-1)
    for num in numerators:
        L = levels((num / safe).unsqueeze(-1) * x)
        swl2, swlx = (w * L * L).sum(-1), (w * L * x).sum(-1)
        s = torch.where(swl2 > 0, swlx / swl2.clamp(min=1e-30), torch.zeros_like(swl2))
        e = (w * (s.unsqueeze(-1) * L - x).pow(2)).sum(-1)
        better = (e < best_e) & (xmax != 0)
        best_s, best_e = torch.where(better, s, best_s), torch.where(better, e, best_e)
    return best_s


def _nearest_table(v: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(IQ4_TABLE, dtype=torch.float32, device=v.device)
    mids = (table[1:] + table[:-1]) / 2
    return torch.bucketize(v, mids).to(torch.uint8)


def _fit_iq4(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """d per block of 32 (ŵ = d·T[c]) over llama.cpp's candidates (k + T[0])/x_max, k = −7 … 7."""
    table = torch.tensor(IQ4_TABLE, dtype=torch.float32, device=x.device)
    return _best_scale(x, w, [k + IQ4_TABLE[0] for k in range(-7, 8)], lambda v: table[_nearest_table(v).long()])


def fit_superblock(x: torch.Tensor, fmt: KQuantFormat, importance: torch.Tensor | None = None) -> dict:
    """The stored statistics for weights x [rows, n, superblock] (importance: [n, superblock] or None), each
    [rows, n, ...] as `KQuantWeight.stats` holds them per super-block."""
    t = fmt.t
    x = x.float()
    rows, n, _ = x.shape
    xs = x.reshape(rows, n, -1, t.sub)
    imp = None if importance is None else importance.float().reshape(1, n, -1, t.sub)
    w = _fit_weights(xs, t, imp)
    if t.name == "iq4_nl":
        return {"d": _fit_iq4(xs, w).squeeze(-1).to(torch.float16).reshape(rows, n, 1)}
    smax = (1 << t.stat_bits) - 1
    if t.minimum:
        rmin, nstep = (-0.5, 15) if t.name == "q2_k" else (-1.0, 20)
        s, m = _fit_minimum(xs, w, (1 << t.bits) - 1, rmin, 0.1, nstep)
        out = {}
        for key, v, sub_key in (("d", s, "a"), ("m", m, "b")):
            top = v.amax(-1, keepdim=True)
            inv = torch.where(top > 0, smax / top.clamp(min=1e-30), torch.zeros_like(top))
            out[sub_key] = (v * inv).round().clamp(0, smax).to(torch.uint8)
            out[key] = (top / smax).to(torch.float16)
        return out
    s = _fit_symmetric(xs, w, t.offset)
    half = 128 if t.name == "q6_k" else 32
    idx = s.abs().argmax(-1, keepdim=True)
    top = s.gather(-1, idx)
    inv = torch.where(top != 0, -half / torch.where(top == 0, torch.ones_like(top), top), torch.zeros_like(top))
    a = (inv * s).round().clamp(-half, half - 1)
    d = torch.where(inv != 0, 1 / torch.where(inv == 0, torch.ones_like(inv), inv), torch.zeros_like(inv))
    return {"d": d.to(torch.float16), "a": (a + 32).to(torch.uint8) if t.name == "q3_k" else a.to(torch.int8)}


def grid_of(t: KType, stats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each sub-block's (S, M) from stats [rows, ...] (`sub_grid`); IQ4_NL's d as S, with no M."""
    if t.name == "iq4_nl":
        return stats["d"].float(), None
    return sub_grid(t, stats)


def _encode(x: torch.Tensor, t: KType, s: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """Codes (uint8) of weights x on sub-block grids s, m broadcast against x (a zero scale gives the zero code)."""
    safe = torch.where(s == 0, torch.ones_like(s), s)
    if t.name == "iq4_nl":
        return _nearest_table(torch.where(s == 0, torch.zeros_like(x), x / safe))
    c = ((x + m) / safe).round() if t.minimum else (x / safe).round() + t.offset
    return torch.where(s == 0, torch.full_like(c, t.offset), c).clamp(0, (1 << t.bits) - 1).to(torch.uint8)


def _values(c: torch.Tensor, t: KType, s: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """ŵ of codes c on grids s, m, in ggml's operations and order."""
    if t.name == "iq4_nl":
        return s * torch.tensor(IQ4_TABLE, dtype=torch.float32, device=c.device)[c.long()]
    return s * c.float() - m if t.minimum else s * (c.float() - t.offset)


def round_codes(x: torch.Tensor, fmt: KQuantFormat, stats: dict) -> torch.Tensor:
    """Codes (uint8) of weights x [rows, n, superblock] on the grid of stats (from `fit_superblock`)."""
    t = fmt.t
    rows, n, _ = x.shape
    s, m = grid_of(t, {k: v.reshape(rows * n, -1) for k, v in stats.items()})
    s, m = s.reshape(rows, n, -1, 1), None if m is None else m.reshape(rows, n, -1, 1)
    return _encode(x.float().reshape(rows, n, -1, t.sub), t, s, m).reshape(rows, n, -1)


def quantize_k(weight: torch.Tensor, fmt: KQuantFormat, importance: torch.Tensor | None = None) -> KQuantWeight:
    """Round-to-nearest of a weight [out, in] to a k-quant (or IQ4_NL) format; importance [in] weights the fits."""
    check_shape(weight.shape, fmt)
    rows, cols = weight.shape
    sb = fmt.superblock
    x = weight.detach().float().reshape(rows, cols // sb, sb)
    imp = None if importance is None else importance.to(x.device).float().reshape(cols // sb, sb)
    stats = fit_superblock(x, fmt, imp)
    codes = round_codes(x, fmt, stats).reshape(rows, cols)
    return KQuantWeight(fmt, codes, {k: v.reshape(rows, -1) for k, v in stats.items()})


def check_shape(shape: tuple[int, ...], fmt: KQuantFormat) -> None:
    if len(shape) != 2:
        raise LowbitError(f"expected a 2-D weight [out, in], got shape {tuple(shape)}.")
    if shape[1] % fmt.superblock:
        raise LowbitError(f"llama.cpp's {fmt.type.upper()} stores rows in blocks of {fmt.superblock} columns; a row "
                          f"of {shape[1]} is not a whole number of them. llama.cpp's mixes fall back to another "
                          "type for such tensors (lowbit's --scheme Q4_K_M etc. do the same).")


def column_grid(fmt: KQuantFormat, stats: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (S, M) of every sub-block of one super-block (stats [rows, 1, ...] from `fit_superblock`), formed once
    for `round_column`."""
    rows = stats["d"].shape[0]
    return grid_of(fmt.t, {k: v.reshape(rows, -1) for k, v in stats.items()})


def round_column(w: torch.Tensor, fmt: KQuantFormat, grid: tuple, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ŵ, codes) of column j of a super-block (w: [rows]) on its grid (`column_grid`): GPTQ's quantizer once the
    super-block's statistics are fixed."""
    t = fmt.t
    sub = j // t.sub
    s, m = grid[0][:, sub], None if grid[1] is None else grid[1][:, sub]
    c = _encode(w, t, s, m)
    return _values(c, t, s, m), c


# --- bytes ------------------------------------------------------------------------------------------------------


def _f16(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float16).contiguous().numpy().view(np.uint8).reshape(*t.shape, 2)


def _bits_into_bytes(v: np.ndarray, width: int) -> np.ndarray:
    """Pack values v [..., k, 32] of `width` bits, k = 8/width planes, into bytes [..., 32]: plane p at bits
    p·width (ggml's layout for 2-bit planes, the 5th/3rd-bit masks and Q6_K's high pairs)."""
    out = np.zeros((*v.shape[:-2], v.shape[-1]), dtype=np.uint8)
    for p in range(v.shape[-2]):
        out |= (v[..., p, :].astype(np.uint8) & ((1 << width) - 1)) << (p * width)
    return out


def to_blocks_k(qw: KQuantWeight) -> np.ndarray:
    """The weight's bytes as ggml stores them: uint8 [rows, in/superblock · block bytes]."""
    t = qw.fmt.t
    rows, cols = qw.shape
    nsb = cols // t.superblock
    c = qw.codes.numpy().astype(np.uint8).reshape(rows, nsb, t.superblock)
    st = {k: v.reshape(rows, nsb, -1) for k, v in qw.stats.items()}
    if t.name == "iq4_nl":
        parts = [_f16(st["d"][..., 0]), c[..., :16] | (c[..., 16:] << 4)]
    elif t.name in ("q4_k", "q5_k"):
        a, b = st["a"].numpy(), st["b"].numpy()
        scales = np.concatenate([a[..., :4] | ((a[..., 4:] >> 4) << 6), b[..., :4] | ((b[..., 4:] >> 4) << 6),
                                 (a[..., 4:] & 15) | ((b[..., 4:] & 15) << 4)], axis=-1)
        low = (c & 15).reshape(rows, nsb, 4, 2, 32)
        qs = (low[..., 0, :] | (low[..., 1, :] << 4)).reshape(rows, nsb, 128)
        parts = [_f16(st["d"][..., 0]), _f16(st["m"][..., 0]), scales]
        if t.name == "q5_k":
            parts.append(_bits_into_bytes((c >> 4).reshape(rows, nsb, 8, 32), 1))
        parts.append(qs)
    elif t.name == "q6_k":
        u = c.reshape(rows, nsb, 2, 128)
        ql = ((u[..., :64] & 15) | ((u[..., 64:] & 15) << 4)).reshape(rows, nsb, 128)
        qh = _bits_into_bytes((u >> 4).reshape(rows, nsb, 2, 4, 32), 2).reshape(rows, nsb, 64)
        parts = [ql, qh, st["a"].numpy().view(np.uint8), _f16(st["d"][..., 0])]
    elif t.name == "q3_k":
        hmask = _bits_into_bytes((c >> 2).reshape(rows, nsb, 8, 32), 1)
        qs = _bits_into_bytes(c.reshape(rows, nsb, 2, 4, 32), 2).reshape(rows, nsb, 64)
        a = st["a"].numpy()
        low = (a[..., :8] & 15) | ((a[..., 8:] & 15) << 4)
        high = _bits_into_bytes((a >> 4).reshape(rows, nsb, 4, 4), 2)
        parts = [hmask, qs, low, high, _f16(st["d"][..., 0])]
    else:  # q2_k
        scales = st["a"].numpy() | (st["b"].numpy() << 4)
        qs = _bits_into_bytes(c.reshape(rows, nsb, 2, 4, 32), 2).reshape(rows, nsb, 64)
        parts = [scales, qs, _f16(st["d"][..., 0]), _f16(st["m"][..., 0])]
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def from_blocks_k(data: np.ndarray, name: str, shape: tuple[int, int]) -> KQuantWeight:
    """Inverse of `to_blocks_k`: the lowbit weight held by ggml bytes of type `name`."""
    t = KTYPES[name]
    rows, cols = shape
    nsb = cols // t.superblock
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows, nsb, t.block_bytes)

    def f16(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x.copy().view(np.float16)[..., 0].reshape(rows, nsb))

    def planes(x: np.ndarray, width: int) -> np.ndarray:  # bytes [..., 32] → [..., 8/width, 32]
        return np.stack([(x >> (p * width)) & ((1 << width) - 1) for p in range(8 // width)], axis=-2)

    u8 = lambda x: torch.from_numpy(np.ascontiguousarray(x).reshape(rows, -1))  # noqa: E731
    if name == "iq4_nl":
        qs = b[..., 2:]
        codes = np.concatenate([qs & 15, qs >> 4], axis=-1)
        stats = {"d": f16(b[..., :2])}
    elif name in ("q4_k", "q5_k"):
        s = b[..., 4:16]
        a = np.concatenate([s[..., :4] & 63, (s[..., 8:] & 15) | ((s[..., :4] >> 6) << 4)], axis=-1)
        bb = np.concatenate([s[..., 4:8] & 63, (s[..., 8:] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
        qs = b[..., -128:].reshape(rows, nsb, 4, 32)
        codes = np.stack([qs & 15, qs >> 4], axis=-2).reshape(rows, nsb, 256)
        if name == "q5_k":
            codes = codes | (planes(b[..., 16:48], 1).reshape(rows, nsb, 256) << 4)
        stats = {"d": f16(b[..., :2]), "m": f16(b[..., 2:4]), "a": u8(a), "b": u8(bb)}
    elif name == "q6_k":
        ql, qh = b[..., :128].reshape(rows, nsb, 2, 64), b[..., 128:192].reshape(rows, nsb, 2, 32)
        low = np.concatenate([ql & 15, ql >> 4], axis=-1)
        codes = (low | (planes(qh, 2).reshape(rows, nsb, 2, 128) << 4)).reshape(rows, nsb, 256)
        stats = {"d": f16(b[..., 208:210]), "a": torch.from_numpy(b[..., 192:208].copy().view(np.int8)
                                                                   .reshape(rows, -1))}
    elif name == "q3_k":
        hmask, qs = b[..., :32], b[..., 32:96].reshape(rows, nsb, 2, 32)
        codes = planes(qs, 2).reshape(rows, nsb, 256) | (planes(hmask, 1).reshape(rows, nsb, 256) << 2)
        s = b[..., 96:108]
        low = np.concatenate([s[..., :8] & 15, s[..., :8] >> 4], axis=-1)
        high = np.stack([(s[..., 8:12] >> (2 * p)) & 3 for p in range(4)], axis=-2).reshape(rows, nsb, 16)
        stats = {"d": f16(b[..., 108:110]), "a": u8(low | (high << 4))}
    else:  # q2_k
        s, qs = b[..., :16], b[..., 16:80].reshape(rows, nsb, 2, 32)
        codes = planes(qs, 2).reshape(rows, nsb, 256)
        stats = {"d": f16(b[..., 80:82]), "m": f16(b[..., 82:84]), "a": u8(s & 15), "b": u8(s >> 4)}
    return KQuantWeight(KQuantFormat(name), torch.from_numpy(codes.astype(np.uint8).reshape(rows, cols)), stats)
