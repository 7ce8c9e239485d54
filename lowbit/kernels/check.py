"""Kernel against reference on random inputs: the check the tests (Triton's interpreter on CPU) and the GPU
benchmark (compiled, on the H200) both run.

The reference is float64: x · dequantize(quantize(W))ᵀ + b, from lowbit.formats. Every case draws fresh weights,
activations and bias, poisons the output buffer's memory first (NaN), and reports ‖y − ref‖ / ‖ref‖.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats import IntFormat, PerChannel, PerGroup, quantize
from lowbit.kernels.linear import Tiles, wxa16_linear

# Output rounding dominates: float16 keeps 11 significant bits, bfloat16 8 (the dot variant also rounds ŵ).
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


@dataclass(frozen=True)
class Case:
    fmt: IntFormat
    m: int
    n: int
    k: int
    bias: bool = False
    tiles: Tiles | None = None

    def describe(self) -> str:
        f = self.fmt
        grid = "asym" if not f.symmetric else ("sym-full" if f.full_range else "sym")
        g = f"g{f.granularity.size}" if isinstance(f.granularity, PerGroup) else "per-channel"
        t = "auto" if self.tiles is None else (f"{self.tiles.mode} {self.tiles.bm}x{self.tiles.bn}x"
                                               f"{self.tiles.bw}w split {self.tiles.split_k}")
        return f"w{f.bits} {grid} {g} M={self.m} N={self.n} K={self.k}{' +bias' if self.bias else ''} [{t}]"


def fmt(bits: int, grid: str, group: int) -> IntFormat:
    gran = PerGroup(group) if group else PerChannel()
    return IntFormat(bits, symmetric=grid != "asym", granularity=gran, full_range=grid == "sym-full")


def run_case(case: Case, device: str, dtype: torch.dtype, seed: int) -> float:
    """Relative error of the kernel on one fresh random problem; NaN if any output was left unwritten."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(case.n, case.k, generator=g) * 0.02
    if not case.fmt.symmetric:
        w += torch.randn(case.n, 1, generator=g) * 0.01  # a row offset, so zero points vary
    qw = quantize(w, case.fmt)
    packed = {name: t.to(device) for name, t in qw.packed().items()}
    x = torch.randn(case.m, case.k, generator=g).to(device, dtype)
    b = (torch.randn(case.n, generator=g) * 0.1).to(device, dtype) if case.bias else None
    torch.empty(case.m * case.n * 4, device=device, dtype=torch.float32).fill_(float("nan"))  # poison the pool
    y = wxa16_linear(x, case.fmt, packed["qweight"], packed["scales"], packed.get("qzeros"), b, case.n, case.tiles)
    ref = x.double().cpu() @ qw.dequantize().double().T
    if b is not None:
        ref += b.double().cpu()
    y = y.double().cpu()
    if not torch.isfinite(y).all():
        return float("nan")
    return float((y - ref).norm() / ref.norm())


def standard_cases(small: bool) -> list[Case]:
    """Every format the kernel covers, ragged shapes, and each tile variant (forced) at least once."""
    variants = [None, Tiles("gemv", 1, 16, 8), Tiles("dot", 16, 32, 16, 2), Tiles("gemv", 1, 8, 32),
                Tiles("dot", 32, 64, 32, 1), Tiles("dequant", 0, 16, 16)]
    shapes = [(1, 96, 256), (3, 80, 384), (19, 64, 640)] if small else \
        [(1, 4096, 4096), (5, 1000, 1536), (16, 1024, 4096), (77, 512, 2048), (300, 768, 1536)]
    cases = []
    i = 0
    for bits in (2, 4, 8):
        for grid in ("sym", "sym-full", "asym"):
            for group in (32, 64, 128, 0):
                m, n, k = shapes[i % len(shapes)]
                cases.append(Case(fmt(bits, grid, group), m, n, k, bias=i % 3 == 0, tiles=variants[i % len(variants)]))
                i += 1
    # K not a multiple of 32 (padded words) and of any block, per-channel
    cases.append(Case(fmt(4, "asym", 0), 2, 48, 200, tiles=Tiles("dot", 16, 16, 16, 2)))
    cases.append(Case(fmt(4, "sym", 0), 20, 48, 200, tiles=None))
    return cases


def check_all(device: str, dtype: torch.dtype, small: bool = False, seed: int = 0) -> list[tuple[str, float, bool]]:
    """(description, relative error, passed) for every standard case."""
    out = []
    for i, case in enumerate(standard_cases(small)):
        err = run_case(case, device, dtype, seed + i)
        out.append((case.describe(), err, err <= TOLERANCE[dtype]))
    return out
