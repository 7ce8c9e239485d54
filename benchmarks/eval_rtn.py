"""Evaluate RTN checkpoints of SmolLM2-135M the way `lowbit eval` does, and check perplexity against transformers.

1. Perplexity of the reference on the first 40 WikiText-2 windows of 2048 tokens: lowbit's value against a plain
   transformers loop (model(window, labels=window).loss per window), printed with their relative difference.
2. For RTN w8a16 (per channel), w4a16 g64 and w3a16 g64: the full `lowbit eval` (KL on MT-bench + Vicuna-bench
   first turns with 256 new tokens, WikiText-2 perplexity on 40 windows, PIQA on an evenly spaced subset), each
   evaluation timed. The reference record (generations, top-16, reference perplexity and PIQA results) is made
   by the first evaluation and reused by the others, as a user would.

    .venv/bin/python benchmarks/eval_rtn.py [--out out/bench] [--piqa-limit 500] [--max-prompts N]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import lowbit
from lowbit import api
from lowbit.eval.perplexity import windows
from lowbit.eval.runner import EvalConfig, evaluate, write_json
from lowbit.recipe import Recipe

SCHEMES = {
    "rtn-w8a16": Recipe(scheme="w8a16", group_size=0),
    "rtn-w4a16-g64": Recipe(scheme="w4a16", group_size=64),
    "rtn-w3a16-g64": Recipe(scheme="w3a16", group_size=64),
}


@torch.no_grad()
def plain_transformers_ppl(model, wins: torch.Tensor) -> float:
    losses = [model(w.unsqueeze(0), labels=w.unsqueeze(0)).loss.item() for w in wins]
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/bench")
    p.add_argument("--piqa-limit", type=int, default=500)
    p.add_argument("--max-prompts", type=int)
    p.add_argument("--windows", type=int, default=40)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    reference = lowbit.load("smollm2-135m")
    tok = lowbit.load_tokenizer("smollm2-135m")
    wins = windows(tok, "wikitext2", 2048, args.windows)
    t = time.perf_counter()
    plain = plain_transformers_ppl(reference, wins)
    print(f"plain transformers loop: WikiText-2 ppl {plain:.6f} over {len(wins)} windows "
          f"({time.perf_counter() - t:.0f} s)", flush=True)

    record = out / "smollm2-reference.safetensors"
    for name, recipe in SCHEMES.items():
        ckpt = out / name
        if not ckpt.exists():
            import copy

            api.save(api.quantize(copy.deepcopy(reference), recipe, progress=False), ckpt)
        cfg = EvalConfig(reference="smollm2-135m", candidate=str(ckpt), kl=True, ppl=("wikitext2",),
                         tasks=("piqa",), max_prompts=args.max_prompts, max_windows=args.windows,
                         limit=args.piqa_limit, reference_record=str(record) if record.exists() else None,
                         save_reference=str(record), progress=False)
        t = time.perf_counter()
        result = evaluate(cfg)
        result["wall_s"] = time.perf_counter() - t
        write_json(result, out / f"{name}.json")
        kl, ppl, piqa = result["kl"], result["ppl"]["wikitext2"], result["tasks"]["piqa"]
        rel = abs(ppl["reference"] - plain) / plain
        print(json.dumps({
            "scheme": name, "bits_per_weight": result["size"]["bits_per_weight"],
            "kl_prefill": kl["prefill"]["mean"], "kl_prefill_ci95": kl["prefill"]["ci95"],
            "kl_generation": kl["generation"]["mean"], "kl_generation_ci95": kl["generation"]["ci95"],
            "kl_full_all": kl["all"]["mean_full"],
            "rejection_prefill": kl["prefill"]["token_rejection_rate"],
            "rejection_generation": kl["generation"]["token_rejection_rate"],
            "tokens_prefill": kl["prefill"]["tokens"], "tokens_generation": kl["generation"]["tokens"],
            "ppl_reference": ppl["reference"], "ppl_candidate": ppl["candidate"],
            "ln_ratio": ppl["ln_ratio"], "ln_ratio_stderr": ppl["ln_ratio_stderr"],
            "ppl_reference_vs_plain_rel": rel, "piqa_n": piqa["n"], "piqa_reference": piqa["reference"],
            "piqa_candidate": piqa["candidate"], "piqa_flips": piqa["flips"],
            "wall_s": round(result["wall_s"], 1), "timings_s": result["timings_s"]}), flush=True)


if __name__ == "__main__":
    main()
