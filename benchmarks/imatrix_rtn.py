"""Round to nearest with and without importance (llama.cpp's imatrix idea, `--method imatrix`) on llama.cpp's
legacy block grids, SmolLM2-135M, every candidate read by the same `lowbit eval` against one reference record.

Rows: RTN (absmax ranges), RTN with the unweighted clipping search (`clip: true`), and imatrix (the same search,
weighted by the mean squared activation per input column from the calibration set), each on q4_0 and q4_1.
Calibration for imatrix: C4, --samples × --seqlen tokens (lowbit's drawing, seed 0), as in the GPTQ/AWQ tables.

    .venv/bin/python benchmarks/imatrix_rtn.py [--schemes q4_0,q4_1] [--max-prompts 160] [--windows 10]
        [--record out/bench/ct/reference.safetensors] [--out out/bench/imatrix]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _eval_row import ci_text, eval_row

from lowbit import api
from lowbit.data.calibration import CalibConfig
from lowbit.recipe import Recipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemes", default="q4_0,q4_1")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-prompts", type=int, default=160)
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--record", default="out/bench/ct/reference.safetensors",
                   help="the reference record to reuse (made here when missing)")
    p.add_argument("--out", default="out/bench/imatrix")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = Path(args.record)
    calib = CalibConfig("c4", args.samples, args.seqlen)
    rows = {}
    for scheme in args.schemes.split(","):
        for label, recipe in ((f"RTN {scheme}", Recipe(method="rtn", scheme=scheme)),
                              (f"RTN {scheme} clip", Recipe(method="rtn", scheme=scheme, clip=True)),
                              (f"imatrix {scheme}", Recipe(method="imatrix", scheme=scheme))):
            d = out / label.replace(" ", "-")
            cached = out / f"{d.name}.eval.json"  # a row is evaluated once; delete the file to redo it
            if cached.exists():
                rows[label] = json.loads(cached.read_text())
                continue
            t = time.perf_counter()
            api.save(api.quantize("smollm2-135m", recipe, calib=calib if recipe.method == "imatrix" else None,
                                  progress=False), d)
            seconds = time.perf_counter() - t
            rows[label] = eval_row(d, record, args.max_prompts, args.windows) | {"quantize_s": seconds}
            cached.write_text(json.dumps(rows[label]))
            print(label, json.dumps(rows[label]), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\nKL on {args.max_prompts} prompts; perplexity on {args.windows} WikiText-2 windows of 2048 "
          f"(reference {next(iter(rows.values()))['ppl_reference']:.3f}); imatrix calibration {args.samples} × "
          f"{args.seqlen} C4 tokens")
    print(f"{'candidate':20}{'KL prefill':>11}{'95% CI':>18}{'KL gen':>9}{'95% CI':>18}{'rej gen':>9}{'ppl':>9}"
          f"{'s':>6}")
    for name, r in rows.items():
        print(f"{name:20}{r['kl_prefill']:11.4f}{ci_text(r['kl_prefill_ci']):>18}{r['kl_generation']:9.4f}"
              f"{ci_text(r['kl_generation_ci']):>18}{r['rejection_generation']:9.4f}{r['ppl']:9.3f}{r['quantize_s']:6.0f}")


if __name__ == "__main__":
    main()
