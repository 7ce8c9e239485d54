"""lowbit's GPU kernels against cuBLAS bf16, torch's tinygemm int4 kernel and the memory floor, on Llama-3-8B's
linear shapes (generated weights), plus the correctness check of every kernel variant.

    python3 benchmarks/gpu_kernels.py [--sweep] [--out DIR]      (on a CUDA machine with Triton; PYTHONPATH=.)

1. Copy bandwidth: a 4 GiB device-to-device copy, bytes read + written; the floor of a layer is the bytes it
   must move (codes, scales, x, y) over that rate.
2. Correctness: lowbit.kernels.check on bf16 and fp16, every format and tile variant, weight-only and W8A8 (fails
   the run if any is off).
3. Timing: each op is captured 50× into a CUDA graph over 8 rotating weight copies (more than the 60 MB L2), the
   graph replayed and timed with CUDA events; the median of 5 replays, per call.
   Columns: w4 g128 and w8 per-channel weight-only; SpQR (3-bit weights and statistics, β1 = β2 = 16, 1% outliers,
   random codes, rows layout; its floor counts the kernel form's bytes); W8A8 int8 (lowbit's Triton kernel) and
   fp8 (cuBLASLt's row-wise scaled matmul where it applies, else lowbit's kernel), both with dynamic per-token
   activation scales, the activation quantization included.
4. --sweep: tile shapes (and the GEMV's code → float variant) for w4 g128 tried at M = 1, 4 and 16 on gate/up and
   down; at M = 1 also the rows layout (lowbit.kernels.gemv_rows, SpQR's) on w4 g128 and SpQR, SpQR's dense part
   and its outliers alone; the best of each is printed. LOWBIT_SWEEP=prototypes skips the w4 tile sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lowbit from this checkout
from lowbit.formats import IntFormat, PerChannel, PerGroup, SpQRFormat, quantize
from lowbit.formats.activation import ActFormat
from lowbit.kernels.check import check_all, check_rows, check_w8a8, random_spqr
from lowbit.kernels.gemv_rows import rows_linear
from lowbit.kernels.linear import Tiles, add_outliers, choose_tiles, w8a8_linear, wxa16_linear
from lowbit.kernels.weights import KernelWeight, kernel_weight

SPQR, SPQR_OUTLIERS = SpQRFormat(3, 16, 16, 3), 0.01
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate/up": (4096, 14336), "down": (14336, 4096)}
MS = (1, 4, 16, 64, 256, 2048)
COPIES = 8
SWEEP_MS = (1, 4, 16)
PROTOTYPES_ONLY = os.environ.get("LOWBIT_SWEEP") == "prototypes"  # --sweep times only the GEMV prototypes


def copy_bandwidth() -> float:
    a = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * 2 * 1024**3 / statistics.median(times)


def graph_time(fn, calls: int = 50) -> float:
    """Seconds per call: `calls` calls (fn(i) uses weight copy i % COPIES) captured into one graph, replayed."""
    for i in range(COPIES):
        fn(i)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i % COPIES)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / calls)
    return statistics.median(times)


def packed_layers(k: int, n: int, fmt: IntFormat) -> list[KernelWeight]:
    """COPIES layers in the kernels' form with generated weights (quantized on the GPU from Gaussian weights)."""
    w = torch.randn(n, k, device="cuda") * 0.02
    base = kernel_weight(quantize(w, fmt))
    # different codes per copy, same statistics: a rotation of the words
    return [dataclasses.replace(base, words=torch.roll(base.words, shifts=i, dims=0)) for i in range(COPIES)]


def spqr_layers(k: int, n: int) -> list[KernelWeight]:
    """COPIES SpQR layers (3-bit weights, 3-bit statistics, β1 = β2 = 16, 1% outliers) with random codes."""
    return [kernel_weight(random_spqr(SPQR, n, k, SPQR_OUTLIERS, torch.Generator("cuda").manual_seed(i)))
            for i in range(COPIES)]


def spqr_bytes(kw: KernelWeight, m: int) -> int:
    """What the SpQR product reads: the kernel form's codes, statistic codes, grids and outliers, plus x and y."""
    o = kw.outliers
    tensors = [kw.words, kw.stats, o.row_ptr, o.cols, o.corrections]
    return sum(t.numel() * t.element_size() for t in tensors) + m * kw.in_features * 2 + m * kw.out_features * 2


def tinygemm_layers(k: int, n: int, group: int) -> list[tuple] | None:
    try:
        res = []
        for _ in range(COPIES):
            q = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
            packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            wp = torch._convert_weight_to_int4pack(packed_u8, 8)
            sz = torch.randn(k // group, n, 2, device="cuda", dtype=torch.bfloat16) * 0.01
            res.append((wp, sz))
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        torch._weight_int4pack_mm(x, res[0][0], group, res[0][1])
        return res
    except (RuntimeError, AttributeError) as e:
        print(f"tinygemm unavailable: {e}")
        return None


def layer_bytes(k: int, n: int, m: int, bits: int, group: int) -> int:
    stats = n * (k // group if group else 1) * 2
    return n * k * bits // 8 + stats + m * k * 2 + m * n * 2


def run_table(bw: float, sweep: bool, ms: tuple[int, ...] = MS) -> tuple[list[dict], list[dict]]:
    rows, sweeps = [], []
    for name, (k, n) in SHAPES.items():
        shape_rows(name, k, n, bw, sweep, rows, sweeps, ms)
        torch.cuda.empty_cache()
    return rows, sweeps


def shape_rows(name: str, k: int, n: int, bw: float, sweep: bool, rows: list, sweeps: list,
               ms: tuple[int, ...] = MS) -> None:
    fmt4 = IntFormat(4, granularity=PerGroup(128))
    fmt8 = IntFormat(8, granularity=PerChannel())
    dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)]
    q4 = packed_layers(k, n, fmt4)
    q8 = packed_layers(k, n, fmt8)
    sp = spqr_layers(k, n)
    tg = tinygemm_layers(k, n, 128)
    i8 = [(torch.randint(0, 256, (n, k), dtype=torch.uint8, device="cuda"),
           torch.rand(1, n, device="cuda") * 1e-3) for _ in range(COPIES)]
    f8 = [((torch.randn(n, k, device="cuda") * 50).to(torch.float8_e4m3fn), torch.rand(1, n, device="cuda") * 1e-3)
          for _ in range(COPIES)]
    a8, af8 = ActFormat("int8"), ActFormat("fp8")
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

        def w4(i: int, t: Tiles | None = None, x=x):
            return wxa16_linear(x, q4[i], None, t)

        t_bf16 = graph_time(lambda i, x=x: F.linear(x, dense[i]))
        t_w4 = graph_time(w4)
        t_w8 = graph_time(lambda i, x=x: wxa16_linear(x, q8[i], None))
        t_sp = graph_time(lambda i, x=x: wxa16_linear(x, sp[i], None))
        t_tg = graph_time(lambda i, x=x: torch._weight_int4pack_mm(x, tg[i][0], 128, tg[i][1])) if tg else None
        t_i8 = graph_time(lambda i, x=x: w8a8_linear(x, a8, None, *i8[i], None))
        t_f8 = graph_time(lambda i, x=x: w8a8_linear(x, af8, None, *f8[i], None))
        t_f8t = graph_time(lambda i, x=x: w8a8_linear(x, af8, None, *f8[i], None, use_cublas_fp8=False))
        row = {"layer": name, "K": k, "N": n, "M": m, "bf16_us": t_bf16 * 1e6, "w4_us": t_w4 * 1e6,
               "w8_us": t_w8 * 1e6, "spqr_us": t_sp * 1e6, "floor_spqr_us": spqr_bytes(sp[0], m) / bw * 1e6,
               "tinygemm_us": t_tg * 1e6 if t_tg else None, "w8a8_int8_us": t_i8 * 1e6,
               "fp8_us": t_f8 * 1e6, "fp8_triton_us": t_f8t * 1e6,
               "floor_w4_us": layer_bytes(k, n, m, 4, 128) / bw * 1e6,
               "floor_w8_us": layer_bytes(k, n, m, 8, 0) / bw * 1e6,
               "floor_bf16_us": (n * k * 2 + m * k * 2 + m * n * 2) / bw * 1e6,
               "tiles": choose_tiles(m, n, k, 4, 132).__dict__}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if sweep and not PROTOTYPES_ONLY and name in ("gate/up", "down") and m in SWEEP_MS:
            best = None
            for t in candidate_tiles(m):
                try:
                    tt = graph_time(lambda i, t=t: w4(i, t), calls=20)
                except Exception as e:  # a shape Triton cannot compile (too many registers, shared memory)
                    print(f"  {t}: {type(e).__name__}")
                    continue
                sweeps.append({"layer": name, "M": m, "tiles": t.__dict__, "us": tt * 1e6})
                if best is None or tt < best[0]:
                    best = (tt, t)
            print(f"  sweep {name} M={m}: best {best[1]} {best[0] * 1e6:.1f} us", flush=True)
        if sweep and PROTOTYPES_ONLY and m == 1:  # the byte permute's exponent word as a literal (2) or a register (3)
            for field in (2, 3):
                t = dataclasses.replace(choose_tiles(m, n, k, 4, 132), field=field)
                _sweep(f"w4 gemv field {field} {name} M={m}", [()], lambda i, t=t: w4(i, t),
                       {"layer": name, "M": m, "field": field}, sweeps)
        if sweep and name in ("gate/up", "down") and m <= 2:
            sweep_rows(name, m, x, q4, sp, sweeps)


def sweep_rows(name: str, m: int, x: torch.Tensor, q4: list, sp: list, sweeps: list) -> None:
    """The rows layout (lowbit.kernels.gemv_rows; SpQR's) at one row of x on w4 g128 and SpQR over its launch
    shapes and both byte-permute variants, SpQR's dense part alone, and the outliers' kernel alone."""
    for label, layers in (("w4", q4), ("spqr", sp)):
        rows = [kw.in_rows_layout() for kw in layers]
        grid = [(bn, bwt, warps, field) for bn in (128, 256) for bwt in (8, 16, 32) for warps in (4, 8)
                for field in (2, 3)]
        _sweep(f"rows-layout {label} {name} M={m}", grid, lambda i, bn, bwt, warps, field, rows=rows: rows_linear(
            x, rows[i], None, Tiles("rows", 1, bn, 0, warps, 3, bwt, field)), {"layer": name, "M": m, "rows": label},
            sweeps)
    dense = [dataclasses.replace(kw, outliers=None) for kw in sp]
    _sweep(f"spqr dense {name} M={m}", [(256, 16, 8, 2), (256, 16, 8, 3)],
           lambda i, bn, bwt, warps, field: rows_linear(x, dense[i], None,
                                                        Tiles("rows", 1, bn, 0, warps, 3, bwt, field)),
           {"layer": name, "M": m, "spqr_dense": True}, sweeps)
    y0 = torch.zeros(m, sp[0].out_features, device="cuda")
    grid = [(bn, ch, warps) for bn in (4, 8, 16) for ch in (32, 64, 128) for warps in (1, 2, 4)]
    _sweep(f"spqr outliers {name} M={m}", grid, lambda i, bn, ch, warps: add_outliers(
        x, y0, sp[i].outliers, bn, ch, warps), {"layer": name, "M": m, "outliers": True}, sweeps)


def _sweep(title: str, grid: list[tuple], call, tags: dict, sweeps: list) -> None:
    """Time call(i, *point) at every point of the grid; record each and print the best."""
    best = None
    for point in grid:
        try:
            tt = graph_time(lambda i, point=point: call(i, *point), calls=20)
        except Exception as e:  # a shape Triton cannot compile (registers, shared memory)
            print(f"  {title} {point}: {type(e).__name__}")
            continue
        sweeps.append({**tags, "point": point, "us": tt * 1e6})
        if best is None or tt < best[0]:
            best = (tt, point)
    if best:
        print(f"  sweep {title}: best {best[1]} {best[0] * 1e6:.1f} us", flush=True)


def candidate_tiles(m: int) -> list[Tiles]:
    out = []
    if m <= 4:
        for field in (1, 2, 3):
            for bn in (16, 32, 64):
                for warps in (4, 8):
                    for split in (1, 2):
                        for unroll in (2, 4):
                            out.append(Tiles("gemv", 1, bn, split, warps, 3, unroll, field))
    if 1 < m <= 16:
        for bn in (32, 64, 128):
            for split in (2, 4, 8):
                for warps in (4, 8):
                    out.append(Tiles("dot", 16, bn, split, warps, 3))
    if m > 16:
        for bn in (16, 32, 64):
            out.append(Tiles("dequant", 0, bn, 1, 4))
        for bm, bn, split in ((64, 128, 1), (64, 64, 2), (128, 128, 1), (64, 128, 2), (128, 64, 1)):
            out.append(Tiles("dot", bm, bn, split, 4, 3))
            out.append(Tiles("dot", bm, bn, split, 8, 3))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--out", default="out/bench/kernels")
    p.add_argument("--ms", default=",".join(map(str, MS)), help="rows of x to time (comma-separated)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    failed = 0
    for dtype in (torch.bfloat16, torch.float16):
        for desc, err, ok in check_all("cuda", dtype) + check_rows("cuda", dtype) + check_w8a8("cuda", dtype):
            failed += not ok
            if not ok:
                print(f"FAILED {dtype} {desc}: rel err {err:.3e}")
    print(f"correctness: {failed} failures", flush=True)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows, sweeps = run_table(bw, args.sweep, tuple(int(v) for v in args.ms.split(",")))
    (out / "kernels.json").write_text(json.dumps({"bandwidth": bw, "rows": rows, "sweeps": sweeps,
                                                   "failures": failed}, indent=1))
    print(f"\n{'layer':8}{'M':>6}{'bf16':>9}{'tinygemm':>10}{'w4 g128':>9}{'floor':>8}{'w8':>9}{'spqr':>8}"
          f"{'sp floor':>9}{'sp/bf16':>8}"
          f"{'w4/bf16':>9}{'w4/tg':>7}{'floor/w4':>9}{'i8a8':>9}{'fp8':>9}{'fp8 tri':>9}{'fp8/bf16':>9}"
          "   (µs; ratios are speed-ups)")
    for r in rows:
        tg = f"{r['tinygemm_us']:10.1f}" if r["tinygemm_us"] else f"{'n/a':>10}"
        vs_tg = f"{r['tinygemm_us'] / r['w4_us']:7.2f}" if r["tinygemm_us"] else f"{'':7}"
        print(f"{r['layer']:8}{r['M']:6d}{r['bf16_us']:9.1f}{tg}{r['w4_us']:9.1f}{r['floor_w4_us']:8.1f}"
              f"{r['w8_us']:9.1f}{r['spqr_us']:8.1f}{r['floor_spqr_us']:9.1f}{r['bf16_us'] / r['spqr_us']:8.2f}"
              f"{r['bf16_us'] / r['w4_us']:9.2f}{vs_tg}{r['floor_w4_us'] / r['w4_us']:9.2f}"
              f"{r['w8a8_int8_us']:9.1f}{r['fp8_us']:9.1f}{r['fp8_triton_us']:9.1f}{r['bf16_us'] / r['fp8_us']:9.2f}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
