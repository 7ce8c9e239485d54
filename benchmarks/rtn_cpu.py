"""RTN on SmolLM2-135M, CPU: quantize time, bits per weight, size, and a first look at quality and speed.

For each scheme: wall time of `lowbit.quantize` (block by block), bits per weight counting every stored bit,
the weights file size; mean full-vocabulary KL(reference ‖ quantized) and top-1 agreement on one WikiText-2
test window; and the forward latency of the packed runtime (dequantize on the fly, plain torch) against the
dense float32 model in the same process. The full evaluation protocol is `lowbit eval`'s job.

    .venv/bin/python benchmarks/rtn_cpu.py [--window 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import platform
import tempfile
import time
from pathlib import Path

import torch

import lowbit
from lowbit import api
from lowbit.data.datasets import wikitext2_test_text
from lowbit.recipe import Recipe

SCHEMES = [
    ("w8a16 per-channel", Recipe(scheme="w8a16", group_size=0)),
    ("w4a16 g64 sym", Recipe(scheme="w4a16", group_size=64)),
    ("w4a16 g64 asym", Recipe(scheme="w4a16", group_size=64, symmetric=False)),
    ("w4a16 g64 sym clip", Recipe(scheme="w4a16", group_size=64, clip=True)),
    ("w4a16 g32 asym float-zero", Recipe(scheme="w4a16", group_size=32, symmetric=False, zero_point="float")),
    ("w4a16 per-channel", Recipe(scheme="w4a16", group_size=0)),
    ("w3a16 g64 sym", Recipe(scheme="w3a16", group_size=64)),
    ("w2a16 g32 asym", Recipe(scheme="w2a16", group_size=32, symmetric=False)),
]


@torch.no_grad()
def compare_on_text(reference, candidate, ids: torch.Tensor) -> dict:
    """Mean full-vocabulary KL(ref ‖ cand) and top-1 agreement over one window of tokens."""
    p = torch.log_softmax(reference(ids).logits.float(), -1)
    q = torch.log_softmax(candidate(ids).logits.float(), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    same_top = (p.argmax(-1) == q.argmax(-1)).float().mean().item()
    return {"tokens": ids.numel(), "kl": kl.mean().item(), "same_top": same_top}


def latency(model, ids: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        model(ids)
        start = time.perf_counter()
        for _ in range(repeats):
            model(ids)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    reference = lowbit.load("smollm2-135m")
    tok = lowbit.load_tokenizer("smollm2-135m")
    ids = tok(wikitext2_test_text(), return_tensors="pt", verbose=False).input_ids[:, : args.window]
    dense = latency(reference, ids, args.repeats)
    print(f"SmolLM2-135M, {ids.shape[1]} WikiText-2 test tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"dense float32 forward: {dense * 1e3:.0f} ms")
    print(f"{'scheme':28} {'quant s':>8} {'bits/w':>7} {'weights MB':>10} {'KL':>8} {'same top':>8} {'fwd ms':>7} "
          f"{'vs dense':>8}")
    for label, recipe in SCHEMES:
        result = api.quantize(copy.deepcopy(reference), recipe, device="cpu", progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            api.save(result, Path(tmp) / "q")
            size = (Path(tmp) / "q" / "model.safetensors").stat().st_size
            model = lowbit.load(Path(tmp) / "q")
        stats = compare_on_text(reference, model, ids)
        fwd = latency(model, ids, args.repeats)
        print(f"{label:28} {result.seconds:8.1f} {result.sizes['bits_per_weight']:7.3f} {size / 1e6:10.1f} "
              f"{stats['kl']:8.4f} {stats['same_top']:8.3f} {fwd * 1e3:7.0f} {fwd / dense:7.2f}x")


if __name__ == "__main__":
    main()
