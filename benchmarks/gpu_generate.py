"""Greedy tokens of a lowbit checkpoint on the GPU kernels against the CPU reference runtime.

    python3 benchmarks/gpu_generate.py CHECKPOINT [--tokens 32]       (on a CUDA machine; PYTHONPATH=.)

The same 8 prompts, greedy: the CPU reference (float32), and on the GPU, for float32 and for float16, lowbit's
Triton kernels and the kernels switched off (plain-torch reference, same dtype). Prints, per prompt, how many of
the first generated tokens agree, and exits non-zero when the float32 kernel run and the CPU run differ in the
first N (float32 on both sides: what differs is only the order of the sums). In float16 a near tie between two
tokens can flip, on the kernels as on the GPU reference; that run is reported, not judged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lowbit from this checkout
import lowbit
from lowbit import kernels

PROMPTS = ["Once upon a time", "Lily and Tom went to the park", "The little dog", "One day, a girl named Sue",
           "The sun was hot and", "Ben had a big red ball", "In the forest there was", "Mom said"]


def generate(model, tok, device: str, tokens: int) -> list[list[int]]:
    out = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        out.append(g[0, ids.shape[1]:].tolist())
    return out


def agree(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args()
    tok = lowbit.load_tokenizer(args.checkpoint)
    cpu = generate(lowbit.load(args.checkpoint), tok, "cpu", args.tokens)
    bad = 0
    for dtype in (torch.float32, torch.float16):
        gpu = generate(lowbit.load(args.checkpoint, dtype=dtype, device="cuda"), tok, "cuda", args.tokens)
        kernels.set_enabled(False)  # the reference on the checkpoint's own layout (moved, not readied for kernels)
        gpu_ref = generate(lowbit.load(args.checkpoint, dtype=dtype).to("cuda"), tok, "cuda", args.tokens)
        kernels.set_enabled(True)
        same = 0
        print(f"--- {dtype}")
        for prompt, c, g, r in zip(PROMPTS, cpu, gpu, gpu_ref, strict=True):
            n, nr, rc = agree(c, g), agree(r, g), agree(r, c)
            same += n == args.tokens
            print(f"{prompt!r:34} kernels vs CPU {n:3d}/{args.tokens}; kernels vs GPU reference {nr:3d}; "
                  f"GPU reference vs CPU {rc:3d}")
        print(f"{dtype}: {same}/{len(PROMPTS)} prompts identical to the CPU reference for {args.tokens} tokens")
        if dtype == torch.float32:
            bad = len(PROMPTS) - same
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
