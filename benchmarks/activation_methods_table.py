"""AWQ, SmoothQuant W8A8, FP8 and the Fireworks levels on SmolLM2-135M: bits, KL, rejection, perplexity.

Same protocol as benchmarks/gptq_spqr_table.py (calibration: 64 windows of 512 tokens from C4 documents 0–511;
KL on the first 80 prompts of the saved reference record; WikiText-2 perplexity on the first 20 windows), so the
RTN and GPTQ rows of that table sit beside these. Sets (--set, comma-separated):

- awq:         AWQ at w4a16 g64 and w3a16 g64, symmetric, with its default (restricted) grid and the full range
- smoothquant: naive W8A8 (per-tensor weights) and SmoothQuant at the paper's O1/O2/O3 with α searched per
               group, plus an α sweep (0.25, 0.5 — the paper's default — and 0.75) at O3
- smooth-all:  SmoothQuant O3 and O2 with --smooth-all (down_proj and o_proj inputs smoothed too)
- fp8:         fp8 weights (per channel) and dynamic per-token fp8 activations
- levels:      Fireworks' L1–L4 with fp8 and with int8 (w8a8 per channel + int8 KV cache), with a zero-shot task

    .venv/bin/python benchmarks/activation_methods_table.py --set awq [--tasks arc_easy --limit 500]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gptq_spqr_table import print_table, run_table, table_args

from lowbit.recipe import Recipe


def sets() -> dict[str, dict[str, Recipe]]:
    sq = {}
    for level, act in (("O1", {}), ("O2", {"act_granularity": "tensor"}),
                       ("O3", {"act_granularity": "tensor", "act_static": True})):
        sq[f"W8A8 naive {level}"] = Recipe(scheme="w8a8", per_tensor=True, **act)
        sq[f"SmoothQuant {level} α searched"] = Recipe(method="smoothquant", scheme="w8a8", per_tensor=True, **act)
    for alpha in (0.25, 0.5, 0.75):
        sq[f"SmoothQuant O3 α={alpha}"] = Recipe(method="smoothquant", scheme="w8a8", per_tensor=True,
                                                 options={"alpha": alpha}, act_granularity="tensor", act_static=True)
    smooth_all = {f"SmoothQuant {level} α searched, all groups": Recipe(method="smoothquant", scheme="w8a8",
                                                                     per_tensor=True, options={"smooth_all": True},
                                                                     **act)
                  for level, act in (("O3", {"act_granularity": "tensor", "act_static": True}),
                                     ("O2", {"act_granularity": "tensor"}))}
    levels = {}
    for level in ("L1", "L2", "L3", "L4"):
        levels[f"{level} fp8"] = Recipe(scheme="fp8", parts=(level,))
        levels[f"{level} int8"] = Recipe(scheme="w8a8", parts=(level,))  # L3/L4: int8 KV cache
    return {
        "awq": {**{f"AWQ {s} g64": Recipe(method="awq", scheme=s, group_size=64) for s in ("w4a16", "w3a16")},
                **{f"AWQ {s} g64 full range": Recipe(method="awq", scheme=s, group_size=64, full_range=True)
                   for s in ("w4a16", "w3a16")}},
        "smoothquant": sq,
        "smooth-all": smooth_all,
        "fp8": {"FP8 (per-channel weights, per-token activations)": Recipe(method="fp8", scheme="fp8")},
        "levels": levels,
    }


def main() -> None:
    import argparse

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--set", default="awq")
    known, rest = extra.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    args = table_args(__doc__.splitlines()[0], "out/bench/activation")
    recipes = {name: r for s in known.set.split(",") for name, r in sets()[s].items()}
    print_table(run_table(recipes, args))


if __name__ == "__main__":
    main()
