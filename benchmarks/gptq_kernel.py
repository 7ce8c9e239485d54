"""GPTQ's two costs per layer on a GPU, side by side: the Hessian products (float32, as lowbit runs them, vs the
TF32 tensor cores, which lowbit does not use: they broke positive definiteness on a real run, BENCHMARKS.md) and
the column loop (PyTorch, about ten launches per column, vs lowbit's one-kernel-per-batch Triton loop).

Llama-3-8B's layer shapes as the pipeline quantizes them (q/k/v stacked, o, gate/up stacked, down), inputs of
262,144 bf16 tokens in batches of 16,384 (generated), w4a16 g128 with act-order. Prints times and agreement: the
share of codes that differ and the layer objective tr(ΔW H ΔWᵀ) of each loop. Run on a GPU machine:

    python benchmarks/gptq_kernel.py [--tokens 262144]
"""

from __future__ import annotations

import argparse
import time

import torch

from lowbit import kernels
from lowbit.formats import IntFormat, PerGroup
from lowbit.methods.gptq import GPTQConfig, accumulate, gptq_quantize, init_stats

SHAPES = {"q/k/v": (6144, 4096), "o_proj": (4096, 4096), "gate/up": (28672, 4096), "down_proj": (4096, 14336)}


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def hessian(k: int, tokens: int, tf32: bool) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(k)
    stats = init_stats(k, "cuda")
    # an outlier channel or two, as real activations have
    spread = torch.ones(k, device="cuda")
    spread[:4] = 30
    for _ in range(tokens // 16384):
        x = (torch.randn(16384, k, device="cuda", generator=g) * spread).to(torch.bfloat16)
        before, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, tf32
        accumulate(stats, x)
        torch.backends.cuda.matmul.allow_tf32 = before
    return stats


def objective(w: torch.Tensor, q: torch.Tensor, H: torch.Tensor) -> float:
    d = w.float() - q.float()
    return float(((d @ H) * d).sum() / (w.float() @ H * w.float()).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=262144)
    args = p.parse_args()
    fmt = IntFormat(bits=4, symmetric=True, granularity=PerGroup(128))
    cfg = GPTQConfig(act_order=True)
    print(f"{torch.cuda.get_device_name()}, {args.tokens} tokens, w4a16 g128 act-order")
    print("| layer | H float32 | H TF32 (bf16 inputs) | max rel. diff | loop: PyTorch | loop: kernel | codes differ |"
          " objective PyTorch | objective kernel |")
    print("|---|---|---|---|---|---|---|---|---|")
    totals = [0.0] * 4
    warm = init_stats(256, "cuda")
    accumulate(warm, torch.randn(512, 256, device="cuda", dtype=torch.bfloat16))
    gptq_quantize(torch.randn(64, 256, device="cuda"), warm, fmt, cfg)  # compiles the kernel
    for name, (rows, cols) in SHAPES.items():
        h32, t32 = timed(lambda cols=cols: hessian(cols, args.tokens, False))
        htf, ttf = timed(lambda cols=cols: hessian(cols, args.tokens, True))
        rel = float((h32.H - htf.H).abs().max() / h32.H.abs().max())
        w = (torch.randn(rows, cols, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
             * cols ** -0.5).to(torch.bfloat16)
        kernels.set_enabled(False)
        ref, tloop = timed(lambda w=w, h=htf: gptq_quantize(w, h, fmt, cfg))
        kernels.set_enabled(True)
        fused, tker = timed(lambda w=w, h=htf: gptq_quantize(w, h, fmt, cfg))
        differ = float((ref.codes != fused.codes).float().mean())
        H = htf.H
        print(f"| {name} {rows}×{cols} | {t32:.3f} s | {ttf:.3f} s | {rel:.1e} | {tloop:.3f} s | {tker:.3f} s | "
              f"{differ:.2e} | {objective(w, ref.dequantize(), H):.5f} | {objective(w, fused.dequantize(), H):.5f} |")
        for k, v in enumerate((t32, ttf, tloop, tker)):
            totals[k] += v
    print(f"per block: Hessians {totals[0]:.2f} s → {totals[1]:.2f} s; column loops {totals[2]:.2f} s → "
          f"{totals[3]:.2f} s")


if __name__ == "__main__":
    main()
