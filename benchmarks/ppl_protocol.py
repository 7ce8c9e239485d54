"""WikiText-2 perplexity of SmolLM2-135M and of the w4/w3 g64 RTN, GPTQ and AWQ rows, on the protocol's text (the
Hugging Face rows joined by "\\n\\n"), to replace the perplexity columns measured on the old text.

Same configurations and calibration as the AWQ vs RTN vs GPTQ table (C4 documents 0–511, 64 × 512, seed 0;
GPTQ act-order; AWQ with its default restricted grid). Checkpoints already made (by llmcompressor_ct.py, the
same w4 g64 GPTQ and AWQ settings) are reused from --reuse. Perplexity only (the KL columns do not depend on the
text): the first --windows windows of 2048 tokens, one tokenization for every model.

    .venv/bin/python benchmarks/ppl_protocol.py [--windows 10] [--out out/bench/ppl]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lowbit
from lowbit import api
from lowbit.data.calibration import CalibConfig
from lowbit.eval.perplexity import ppl, token_nll, windows
from lowbit.recipe import Recipe

ROWS = {
    "RTN w4a16 g64": Recipe(method="rtn", scheme="w4a16", group_size=64),
    "RTN w4a16 g64 restricted": Recipe(method="rtn", scheme="w4a16", group_size=64, full_range=False),
    "GPTQ w4a16 g64": Recipe(method="gptq", scheme="w4a16", group_size=64, options={"act_order": True}),
    "AWQ w4a16 g64": Recipe(method="awq", scheme="w4a16", group_size=64),
    "RTN w3a16 g64": Recipe(method="rtn", scheme="w3a16", group_size=64),
    "RTN w3a16 g64 restricted": Recipe(method="rtn", scheme="w3a16", group_size=64, full_range=False),
    "GPTQ w3a16 g64": Recipe(method="gptq", scheme="w3a16", group_size=64, options={"act_order": True}),
    "AWQ w3a16 g64": Recipe(method="awq", scheme="w3a16", group_size=64),
}
REUSED = {"GPTQ w4a16 g64": "lowbit-gptq", "AWQ w4a16 g64": "lowbit-awq"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--out", default="out/bench/ppl")
    p.add_argument("--reuse", default="out/bench/ct")
    args = p.parse_args()
    out = Path(args.out)
    tok = lowbit.load_tokenizer("smollm2-135m")
    reference = lowbit.load("smollm2-135m")
    ref_nll = token_nll(reference, windows(tok, "wikitext2", 2048, 40), progress=False)
    for n in (2, 10, 20, 40):
        print(f"reference, {n} windows: {ppl(ref_nll[:n]):.3f}", flush=True)
    wins = windows(tok, "wikitext2", 2048, args.windows)
    calib = CalibConfig("c4", 64, 512)
    for name, recipe in ROWS.items():
        d = Path(args.reuse) / REUSED[name] if name in REUSED else out / name.replace(" ", "-")
        if not d.exists():
            result = api.quantize("smollm2-135m", recipe, tokenizer=tok,
                                  calib=calib if recipe.method != "rtn" else None, device="cpu", progress=False)
            api.save(result, d, tokenizer=tok)
        print(f"{name}: {ppl(token_nll(lowbit.load(d), wins, progress=False)):.2f} ({args.windows} windows)",
              flush=True)


if __name__ == "__main__":
    main()
