"""Kernel against reference on random inputs: the check the tests (Triton's interpreter on CPU) and the GPU
benchmark (compiled, on the H200) both run.

The reference is float64: x · dequantize(quantize(W))ᵀ + b (lowbit.formats) for the weight-only kernels, and
(X_q · W_qᵀ)·s_x·s_w + b with the activation codes from lowbit.formats.activation for W8A8. Every case draws
fresh weights, activations and bias, poisons the output buffer's memory first (NaN), and reports
‖y − ref‖ / ‖ref‖.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats import (
    FP8Format,
    IntFormat,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantizedWeight,
    SpQRFormat,
    SpQRWeight,
    from_packed,
    quantize,
)
from lowbit.formats.activation import ActFormat, activation_scale, dynamic_amax, encode_activation
from lowbit.formats.spqr import to_csr
from lowbit.kernels.linear import Tiles, w8a8_linear, wxa16_linear
from lowbit.kernels.weights import kernel_weight

# Output rounding dominates: float16 keeps 11 significant bits, bfloat16 8 (the dot variant also rounds ŵ).
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


@dataclass(frozen=True)
class Case:
    fmt: IntFormat | SpQRFormat
    m: int
    n: int
    k: int
    bias: bool = False
    tiles: Tiles | None = None
    outlier_rate: float = 0.0  # SpQR

    def describe(self) -> str:
        f = self.fmt
        t = "auto" if self.tiles is None else (f"{self.tiles.mode} {self.tiles.bm}x{self.tiles.bn} "
                                               f"split {self.tiles.split_k}")
        if isinstance(f, SpQRFormat):
            stats = f"{f.stat_bits}-bit stats" if f.quantized_stats else "16-bit stats"
            what = f"spqr w{f.bits} β1={f.beta1} β2={f.beta2} {stats} {self.outlier_rate:.1%} outliers"
        else:
            grid = "asym" if not f.symmetric else ("sym-full" if f.full_range else "sym")
            grid += " float-min" if f.float_zero else ""
            g = f"g{f.granularity.size}" if isinstance(f.granularity, PerGroup) else "per-channel"
            what = f"w{f.bits} {grid} {g}{' g_idx' if f.g_idx else ''}"
        return f"{what} M={self.m} N={self.n} K={self.k}{' +bias' if self.bias else ''} [{t}]"


def fmt(bits: int, grid: str, group: int, g_idx: bool = False) -> IntFormat:
    gran = PerGroup(group) if group else PerChannel()
    return IntFormat(bits, symmetric=grid not in ("asym", "float-min"), granularity=gran, full_range=grid == "sym-full",
                     zero_point="float" if grid == "float-min" else "int", g_idx=g_idx)


def random_weight(case: Case, g: torch.Generator) -> QuantizedWeight | SpQRWeight:
    """A quantized weight for the case (CPU): RTN of a random matrix, or, for a column → group map and for SpQR
    (which need calibration to make), random codes and statistics in their valid ranges."""
    f, n, k = case.fmt, case.n, case.k
    if isinstance(f, SpQRFormat):
        return random_spqr(f, n, k, case.outlier_rate, g)
    if f.g_idx:
        size = f.granularity.size
        groups = -(-k // size)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[torch.randperm(k, generator=g)] = (torch.arange(k) // size).to(torch.int32)
        codes = torch.randint(0, 2**f.bits, (n, k), generator=g, dtype=torch.uint8)
        scale = (torch.rand(n, groups, generator=g) * 0.01 + 1e-3).to(torch.float16)
        zero = None if f.symmetric else torch.randint(0, 2**f.bits, (n, groups), generator=g, dtype=torch.uint8)
        return QuantizedWeight(f, codes, scale, zero, g_idx)
    w = torch.randn(n, k, generator=g) * 0.02
    if not f.symmetric:
        w += torch.randn(n, 1, generator=g) * 0.01  # a row offset, so zero points vary
    return quantize(w, f)


def random_spqr(f: SpQRFormat, n: int, k: int, rate: float, g: torch.Generator) -> SpQRWeight:
    """A SpQR weight [n, k] with random codes, statistics in their valid ranges and a fraction `rate` of outliers,
    on the generator's device."""
    groups = k // f.beta1
    dev = g.device
    codes = torch.randint(0, 2**f.bits, (n, k), generator=g, dtype=torch.uint8, device=dev)
    if f.quantized_stats:
        def grid() -> torch.Tensor:  # (step, min) per β2 rows and column group; decoded s, z stay positive
            return (torch.rand(n // f.beta2, groups, 2, generator=g, device=dev) * 0.004 + 1e-4).to(torch.float16)

        def stat() -> torch.Tensor:
            return torch.randint(0, 2**f.stat_bits, (n, groups), generator=g, dtype=torch.uint8, device=dev)

        s, z, sg, zg = stat(), stat(), grid(), grid() * 500
    else:
        s = (torch.rand(n, groups, generator=g, device=dev) * 0.01 + 1e-3).to(torch.float16)
        z = (torch.rand(n, groups, generator=g, device=dev) * (2**f.bits - 1)).to(torch.float16)
        sg = zg = None
    mask = torch.rand(n, k, generator=g, device=dev) < rate
    row_ptr, cols, values = to_csr(mask, torch.randn(n, k, generator=g, device=dev) * 0.2)
    return SpQRWeight(f, codes, s, z, sg, zg, row_ptr, cols, values)


def run_case(case: Case, device: str, dtype: torch.dtype, seed: int, kernel=None) -> float:
    """Relative error of the kernel on one fresh random problem; NaN if any output was left unwritten. kernel:
    (x, KernelWeight, bias) → y, by default `wxa16_linear` with the case's tiles."""
    g = torch.Generator().manual_seed(seed)
    qw = random_weight(case, g)
    on_device = from_packed(case.fmt, qw.shape, {name: t.to(device) for name, t in qw.packed().items()})
    x = torch.randn(case.m, case.k, generator=g).to(device, dtype)
    b = (torch.randn(case.n, generator=g) * 0.1).to(device, dtype) if case.bias else None
    torch.empty(case.m * case.n * 4, device=device, dtype=torch.float32).fill_(float("nan"))  # poison the pool
    kw = kernel_weight(on_device)
    y = kernel(x, kw, b) if kernel is not None else wxa16_linear(x, kw, b, case.tiles)
    ref = x.double().cpu() @ qw.dequantize().double().T
    if b is not None:
        ref += b.double().cpu()
    return relative_error(y, ref)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """‖y − ref‖ / ‖ref‖ in float64, NaN if any output is not finite (left unwritten)."""
    y = y.double().cpu()
    if not torch.isfinite(y).all():
        return float("nan")
    return float((y - ref).norm() / ref.norm())


def standard_cases(small: bool) -> list[Case]:
    """Every format the kernel covers, ragged shapes, and each tile variant (forced) at least once."""
    variants = [None, Tiles("gemv", 1, 16, 1, 4, 3, 4), Tiles("dot", 16, 32, 2), Tiles("gemv", 1, 8, 3),
                Tiles("dot", 32, 64, 1), Tiles("dequant", 0, 16), Tiles("gemv", 1, 32, 2, 4, 3, 2, field=1)]
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
    # codes in wider fields (3 → 4 bits, 5 and 6 → 8), minimums, column → group maps, SpQR
    extra = [fmt(3, "sym", 64), fmt(3, "asym", 128), fmt(3, "sym-full", 0), fmt(5, "asym", 32), fmt(6, "sym", 64),
             fmt(4, "float-min", 32), fmt(4, "float-min", 0), fmt(4, "asym", 32, g_idx=True),
             fmt(3, "sym", 64, g_idx=True), SpQRFormat(3, 16, 16, 3), SpQRFormat(4, 16, 16, 16),
             SpQRFormat(3, 32, 8, 2)]
    rows_variants = [None, Tiles("rows", 1, 32, 2, 4, unroll=4), Tiles("dequant", 0, 16, unroll=8),
                     Tiles("rows", 1, 64, 0, 4, unroll=2, field=1)]  # SpQR's layout (lowbit.kernels.gemv_rows)
    for f in extra:
        vs = rows_variants if isinstance(f, SpQRFormat) else variants
        for variant in (vs[i % len(vs)], vs[(i + 3) % len(vs)]):
            m, n, k = shapes[i % len(shapes)]
            cases.append(Case(f, m, n, k, bias=i % 3 == 0, tiles=variant,
                              outlier_rate=0.02 if isinstance(f, SpQRFormat) else 0.0))
            i += 1
    # K not a multiple of 32 (padded words) and of any block, per-channel
    cases.append(Case(fmt(4, "asym", 0), 2, 48, 200, tiles=Tiles("dot", 16, 16, 2)))
    cases.append(Case(fmt(4, "sym", 0), 20, 48, 200, tiles=None))
    return cases


ROWS_FORMS = [fmt(4, "sym", 128), fmt(4, "asym", 32), fmt(8, "sym-full", 0), fmt(2, "asym", 64),
                   fmt(3, "sym", 64), fmt(4, "float-min", 32), fmt(4, "sym", 64, g_idx=True), SpQRFormat(3, 16, 16, 3),
                   fmt(8, "asym", 16), fmt(2, "sym", 16), fmt(4, "float-min", 0)]


def _rows_cases(small: bool) -> list[Case]:
    """One and two rows of x, every kind of statistics, groups narrower and wider than a tile, per channel."""
    shapes = [(1, 96, 256), (2, 80, 384)] if small else [(1, 4096, 4096), (2, 1008, 1536)]
    return [Case(f, *shapes[i % 2], bias=i % 2 == 0, outlier_rate=0.02 if isinstance(f, SpQRFormat) else 0.0)
            for i, f in enumerate(ROWS_FORMS)]


def check_rows(device: str, dtype: torch.dtype, small: bool = False, seed: int = 0) -> list[tuple[str, float, bool]]:
    """The rows layout (lowbit.kernels.gemv_rows, SpQR's) for every kind of statistics: its GEMV at one and two rows
    of x with K split one to three ways, per-word and per-step groups, and its dequantization."""
    from lowbit.kernels.gemv_rows import rows_linear

    out = []
    for i, case in enumerate(_rows_cases(small)):
        tiles = Tiles("rows", 1, *((32, 1 + (seed + i) % 3, 4, 3, 8) if i % 2 else (64, 1 + (seed + i) % 3, 8, 3, 4)))
        if i % 4 == 3:
            tiles = Tiles("dequant", 0, 32, unroll=8)

        def rows(x, kw, b, tiles=tiles):
            return rows_linear(x, kw.in_rows_layout(), b, tiles)

        err = run_case(case, device, dtype, seed + i, rows)
        label = f"rows {tiles.bn}x{tiles.unroll} split {tiles.split_k}" if tiles.mode == "rows" else "rows dequant"
        out.append((case.describe().replace("[auto]", f"[{label}]"), err, err <= TOLERANCE[dtype]))
    return out


def check_all(device: str, dtype: torch.dtype, small: bool = False, seed: int = 0) -> list[tuple[str, float, bool]]:
    """(description, relative error, passed) for every standard case."""
    out = []
    for i, case in enumerate(standard_cases(small)):
        err = run_case(case, device, dtype, seed + i)
        out.append((case.describe(), err, err <= TOLERANCE[dtype]))
    return out


@dataclass(frozen=True)
class W8A8Case:
    weight: str  # "int8" (symmetric, 8-bit codes) or "fp8"
    act: ActFormat
    m: int
    n: int
    k: int
    per_tensor_weight: bool = False
    bias: bool = False
    cublas: bool = False
    tiles: Tiles | None = None

    def describe(self) -> str:
        w = f"{self.weight} {'per-tensor' if self.per_tensor_weight else 'per-channel'}"
        split = f" split {self.tiles.split_k}" if self.tiles else ""
        return (f"w8a8 {w} × {self.act.describe()} M={self.m} N={self.n} K={self.k}"
                f"{' +bias' if self.bias else ''} [{'cublas' if self.cublas else 'triton'}{split}]")


def run_w8a8_case(case: W8A8Case, device: str, dtype: torch.dtype, seed: int) -> float:
    """Relative error of w8a8_linear against float64 (X_q · W_qᵀ)·s_x·s_w computed from lowbit.formats on CPU."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(case.n, case.k, generator=g) * 0.02
    gran = PerTensor() if case.per_tensor_weight else PerChannel()
    if case.weight == "int8":
        qw = quantize(w, IntFormat(8, symmetric=True, granularity=gran))
        wq = qw.packed()["qweight"].view(torch.uint8).reshape(case.n, -1)
        w_codes = qw.codes.double() - 128
    else:
        qw = quantize(w, FP8Format(granularity=gran))
        wq = qw.codes
        w_codes = qw.codes.double()
    sw = qw.scale.float().reshape(1, -1)
    x = (torch.randn(case.m, case.k, generator=g) * torch.rand(case.m, 1, generator=g) * 4).to(dtype)
    input_scale = activation_scale(dynamic_amax(x.float(), case.act), case.act) * 0.8 if case.act.static else None
    b = (torch.randn(case.n, generator=g) * 0.1).to(dtype) if case.bias else None
    xq, sx = encode_activation(x.float(), case.act, input_scale)
    ref = (xq.double() @ w_codes.T) * sx.double() * sw.double()
    if b is not None:
        ref += b.double()
    y = w8a8_linear(x.to(device), case.act, None if input_scale is None else input_scale.to(device), wq.to(device),
                    sw.to(device), None if b is None else b.to(device), use_cublas_fp8=case.cublas, tiles=case.tiles)
    return relative_error(y, ref)


def w8a8_cases(small: bool, cublas: bool, kinds: tuple[str, ...] = ("int8", "fp8")) -> list[W8A8Case]:
    """Both weight kinds, dynamic per-token, dynamic per-tensor and static activations, ragged M and K."""
    shapes = [(1, 64, 200), (5, 96, 256), (33, 160, 384)] if small else \
        [(1, 4096, 4096), (16, 1024, 4096), (77, 512, 2000), (512, 1536, 1024)]
    acts = [ActFormat("int8"), ActFormat("int8", "tensor"), ActFormat("int8", "tensor", static=True),
            ActFormat("fp8"), ActFormat("fp8", "tensor", static=True)]
    acts = [a for a in acts if a.kind in kinds]
    cases = []
    for i, act in enumerate(acts):
        for j, (m, n, k) in enumerate(shapes):
            split = Tiles("dot", 16, 32, 3) if (i + j) % 4 == 1 else None  # K split three ways, fp32 atomics
            cases.append(W8A8Case(act.kind, act, m, n, k, per_tensor_weight=(i + j) % 3 == 2, bias=j % 2 == 0,
                                  tiles=split))
    if cublas and "fp8" in kinds:
        cases += [W8A8Case("fp8", ActFormat("fp8"), 32, 256, 512, cublas=True, bias=True),
                  W8A8Case("fp8", ActFormat("fp8", "tensor", static=True), 2048, 512, 1024, cublas=True)]
    return cases


def check_w8a8(device: str, dtype: torch.dtype, small: bool = False, seed: int = 0,
               kinds: tuple[str, ...] = ("int8", "fp8")) -> list[tuple[str, float, bool]]:
    """(description, relative error, passed) for every W8A8 case of these kinds; cuBLASLt's fp8 cases only on a
    CUDA device with bfloat16."""
    cublas = device.startswith("cuda") and dtype == torch.bfloat16
    out = []
    for i, case in enumerate(w8a8_cases(small, cublas, kinds)):
        err = run_w8a8_case(case, device, dtype, seed + i)
        out.append((case.describe(), err, err <= TOLERANCE[dtype]))
    return out
