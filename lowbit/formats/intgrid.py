"""Uniform integer grids of 2–8 bits, symmetric or asymmetric (with a zero point).

Codes are stored unsigned, c ∈ [0, 2^b − 1], and dequantize as ŵ = (c − z)·s.

- symmetric:  s = max|w| / (2^(b−1) − 1),  z = 2^(b−1)            (the zero point is implicit)
  full range: s = max|w| / (2^(b−1) − ½),  z = 2^(b−1)            (GPTQ's reference code, AutoGPTQ and
              llm-compressor: a step finer by (2^(b−1) − ½)/(2^(b−1) − 1); ±max|w| lie half a step beyond the
              outer codes, still within the half-step bound)
- asymmetric: s = (max(w, 0) − min(w, 0)) / (2^b − 1),  z = round(−min(w, 0) / s)
- codes:      c = clamp(round(w / s) + z, 0, 2^b − 1)
- signed (llama.cpp's Q4_0/Q5_0): s = x_max / −2^(b−1), z = 2^(b−1), x_max the weight of largest magnitude with its
              sign: it lands exactly on c = 0, the code the symmetric grid has beyond −(2^(b−1) − 1); s < 0 when
              x_max > 0 (the grid is mirrored), and the other side saturates at 2^(b−1) − 1 steps

Asymmetric grids take an integer zero point z (GPTQ, AWQ, vLLM; packed at b bits) by default. With
`zero_point="float"` they take llama.cpp's Q4_1-style float offset instead: ŵ = c·s + m with
m = min(w) and s = (max(w) − min(w)) / (2^b − 1), m stored in float16 — the grid need not contain 0.

Scales are stored in float16 and rounded *up* to the next float16 value, so an absmax scale stays
non-saturating after storage and |w − ŵ| ≤ s/2 holds for every weight (the property the tests check).
A clipping search (lowbit.formats.search) shrinks the range per group to trade a few saturated weights for a
finer step; it is the saturating alternative.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.errors import LowbitError
from lowbit.formats.granularity import Granularity, PerChannel, PerGroup, granularity_from_dict

SCALE_DTYPE = torch.float16
_SMALLEST_SCALE = 2.0**-24  # the smallest positive float16 (subnormal)


@dataclass(frozen=True)
class IntFormat:
    """b-bit integer weights; `clip` selects the error-minimizing range search instead of absmax."""

    bits: int
    symmetric: bool = True
    granularity: Granularity = field(default_factory=PerChannel)
    clip: bool = False
    zero_point: str = "int"
    full_range: bool = False  # symmetric only: spread max|w| over all 2^b codes
    g_idx: bool = False  # groups given by a stored column → group map (GPTQ act-order without static groups)
    # symmetric only, llama.cpp's Q4_0/Q5_0 rule: s = x_max / −2^(b−1) with x_max the group's weight of largest
    # magnitude, sign included, so that weight lands exactly on the grid's extra code (c = 0) and s may be negative
    signed_scale: bool = False

    kind = "int"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise LowbitError(f"integer formats have 2 to 8 bits; got {self.bits!r}. Pick a bit width in 2..8.")
        if self.zero_point not in ("int", "float"):
            raise LowbitError(f"zero point {self.zero_point!r} is not known: use 'int' (GPTQ/vLLM) or 'float' "
                              f"(llama.cpp Q4_1-style minimum).")
        if self.symmetric and self.zero_point == "float":
            raise LowbitError("a float zero point only applies to asymmetric grids: add --asym.")
        if self.g_idx and not isinstance(self.granularity, PerGroup):
            raise LowbitError("a column → group map (g_idx) needs groups: give a group size.")
        if self.full_range and not self.symmetric:
            raise LowbitError("--full-range applies to symmetric grids (an asymmetric grid uses every code already).")
        if self.signed_scale and (not self.symmetric or self.full_range):
            raise LowbitError("a signed scale (llama.cpp's Q4_0/Q5_0 rule) applies to symmetric grids without "
                              "--full-range.")

    @property
    def float_zero(self) -> bool:
        return not self.symmetric and self.zero_point == "float"

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def to_dict(self) -> dict:
        return {"kind": "int", "bits": self.bits, "symmetric": self.symmetric,
                "granularity": self.granularity.to_dict(), "clip": self.clip, "zero_point": self.zero_point,
                "full_range": self.full_range, **({"g_idx": True} if self.g_idx else {}),
                **({"signed_scale": True} if self.signed_scale else {})}

    @classmethod
    def from_dict(cls, d: dict) -> IntFormat:
        return cls(bits=int(d["bits"]), symmetric=bool(d["symmetric"]),
                   granularity=granularity_from_dict(d["granularity"]), clip=bool(d.get("clip", False)),
                   zero_point=d.get("zero_point", "int"), full_range=bool(d.get("full_range", False)),
                   g_idx=bool(d.get("g_idx", False)), signed_scale=bool(d.get("signed_scale", False)))


def exact_div(x: torch.Tensor, d: float) -> torch.Tensor:
    """x / d, correctly rounded on every device.

    PyTorch's CUDA kernel turns division by a Python number into multiplication by its reciprocal, which can
    differ from the CPU's result in the last bit; dividing by a 0-dim tensor on x's device does not. Scales must
    not depend on the device, or CPU and GPU quantization would disagree.
    """
    return x / torch.full((), d, dtype=x.dtype, device=x.device)


def round_scale_up(scale: torch.Tensor) -> torch.Tensor:
    """Float16 scale ≥ the float32 one (so absmax ranges stay inside the grid), at least the smallest float16."""
    scale = scale.float().clamp(min=_SMALLEST_SCALE)
    half = scale.to(SCALE_DTYPE)
    half = torch.where(half.float() < scale, torch.nextafter(half, torch.full_like(half, float("inf"))), half)
    _check_finite_scale(half)
    return half


def _check_finite_scale(half: torch.Tensor) -> None:
    if torch.isinf(half).any():
        raise LowbitError("a weight is too large for a float16 scale or offset (|w| above about 6.5e4). "
                          "Check the model's weights for corrupt values.")


def grid_params(lo: torch.Tensor, hi: torch.Tensor, fmt: IntFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float16) and zero point for groups whose range is [lo, hi].

    The zero point is uint8 codes, or for a float zero point the float16 minimum m ≤ lo. The float variant
    rounds s to the nearest float16 (so an exactly representable Q4_1 grid is reproduced bit for bit) unless
    that would leave max(w) more than s/2 beyond the grid, in which case s is rounded up.
    """
    if fmt.float_zero:
        m = lo.to(SCALE_DTYPE)
        m = torch.where(m.float() > lo, torch.nextafter(m, torch.full_like(m, float("-inf"))), m)
        needed = exact_div(hi - m.float(), fmt.qmax)
        nearest = needed.clamp(min=_SMALLEST_SCALE).to(SCALE_DTYPE)
        _check_finite_scale(nearest)
        # Nearest rounding can leave hi uncovered only where float16 steps are coarse (|m| ≫ s, subnormal s).
        covered = hi - (m.float() + fmt.qmax * nearest.float()) <= nearest.float() / 2
        return torch.where(covered, nearest, round_scale_up(needed)), m
    if fmt.symmetric and fmt.signed_scale:
        xmax = torch.where(hi >= -lo, hi, lo)  # the weight of largest magnitude, with its sign
        scale = exact_div(xmax, -(2 ** (fmt.bits - 1))).to(SCALE_DTYPE)
        _check_finite_scale(scale)
        scale = torch.where(scale == 0, torch.full_like(scale, _SMALLEST_SCALE), scale)  # an all-zero group
        return scale, torch.full_like(scale, 2 ** (fmt.bits - 1), dtype=torch.uint8)
    if fmt.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = round_scale_up(exact_div(amax, 2 ** (fmt.bits - 1) - (0.5 if fmt.full_range else 1)))
        zero = torch.full_like(scale, 2 ** (fmt.bits - 1), dtype=torch.uint8)
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = round_scale_up(exact_div(hi - lo, fmt.qmax))
        zero = torch.round(-lo / scale.float()).clamp(0, fmt.qmax).to(torch.uint8)
    return scale, zero


def encode(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """Codes for grouped weights wg [rows, groups, size] given [rows, groups] scale and zero."""
    s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
    q = torch.round((wg - z) / s) if fmt.float_zero else torch.round(wg / s) + z
    return q.clamp(0, fmt.qmax).to(torch.uint8)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """ŵ = (c − z)·s (integer zero) or c·s + m (float zero) in float32, for grouped codes [rows, groups, size]."""
    s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
    return codes.float() * s + z if fmt.float_zero else (codes.float() - z) * s
