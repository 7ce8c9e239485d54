"""lowbit's GGUFs against llama.cpp's own quantizer on SmolLM2-135M, mix by mix, every file read by the same
`lowbit eval` against one reference record.

llama.cpp's files are made by llama.cpp itself (`llama_model_quantize`, the function behind llama-quantize, through
llama-cpp-python, a test dependency of lowbit): first a float16 base from the built-in GGUF (whose weights are
SmolLM2's Q4_1 file: lowbit's float reference is that file dequantized, so both sides start from the same floats),
then each mix from that base, without an importance matrix (llama-imatrix is not in llama-cpp-python; building
llama.cpp's tools is the next step, see BENCHMARKS.md). lowbit's files come from `lowbit quantize smollm2-135m
--scheme MIX --format gguf` with RTN, imatrix (importance-weighted RTN) and GPTQ (C4 calibration, --samples ×
--seqlen tokens, seed 0). Both sides keep the token embedding at the source's Q8_0, which is also what llama.cpp's
mixes choose for it (Q6_K, falling back to Q8_0 on rows of 576).

Scored by `lowbit eval` on dequantized weights in float32 (transformers' GGUF reader: what the file stores, not
llama.cpp's arithmetic): KL on reference generations (Fireworks' method, prefill and generation) and perplexity on
WikiText-2 windows of 2048, with the file size.

    .venv/bin/python benchmarks/llamacpp_mixes.py [--mixes q4_0,q4_k_m,q3_k_m] [--methods rtn,imatrix,gptq]
        [--max-prompts 48] [--windows 4] [--samples 32] [--seqlen 512] [--out out/bench/llamacpp]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _eval_row import cached_rows, ci_text, eval_row

# llama.cpp's LLAMA_FTYPE_MOSTLY_* (llama.h)
FTYPE = {"f16": 1, "q4_0": 2, "q3_k_m": 12, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18, "q8_0": 7}


def llama_quantize(src: Path, dst: Path, ftype: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise SystemExit(f"llama_model_quantize failed ({rc}) for {dst}")


def lowbit_quantize(mix: str, method: str, dst: Path, samples: int, seqlen: int) -> None:
    cmd = [sys.executable, "-m", "lowbit", "quantize", "smollm2-135m", "--method", method, "--scheme", mix,
           "--format", "gguf", "--out", str(dst), "--quiet"]
    if method != "rtn":
        cmd += ["--calib", "c4", "--calib-samples", str(samples), "--calib-seqlen", str(seqlen)]
    subprocess.run(cmd, check=True)


def main() -> None:
    from lowbit.model.builtin import builtin_gguf

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mixes", default="q4_0,q4_k_m,q3_k_m")
    p.add_argument("--methods", default="rtn,imatrix,gptq")
    p.add_argument("--max-prompts", type=int, default=48)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--out", default="out/bench/llamacpp")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = out / "reference.safetensors"
    base = out / "base-f16.gguf"
    if not base.exists():
        llama_quantize(builtin_gguf("smollm2-135m"), base, FTYPE["f16"])
    files = {}
    for mix in args.mixes.split(","):
        files[f"llama.cpp {mix}"] = (out / f"llama-{mix}.gguf", lambda d, mix=mix: llama_quantize(base, d, FTYPE[mix]))
        for method in args.methods.split(","):
            files[f"lowbit {method} {mix}"] = (out / f"lowbit-{method}-{mix}.gguf",
                                               lambda d, mix=mix, method=method: lowbit_quantize(
                                                   mix, method, d, args.samples, args.seqlen))
    rows = cached_rows(files, lambda path: eval_row(path, record, args.max_prompts, args.windows), ".eval.json",
                       "quantize_s")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\nKL on {args.max_prompts} prompts; perplexity on {args.windows} WikiText-2 windows of 2048 (reference "
          f"{next(iter(rows.values()))['ppl_reference']:.3f}); calibration {args.samples} × {args.seqlen} C4 tokens")
    print(f"{'file':24}{'MB':>7}{'KL prefill':>11}{'95% CI':>18}{'KL gen':>9}{'95% CI':>18}{'ppl':>9}{'s':>6}")
    for name, r in rows.items():
        print(f"{name:24}{r['mb']:7.1f}{r['kl_prefill']:11.4f}{ci_text(r['kl_prefill_ci']):>18}{r['kl_generation']:9.4f}"
              f"{ci_text(r['kl_generation_ci']):>18}{r['ppl']:9.3f}{r['quantize_s']:6.0f}")


if __name__ == "__main__":
    main()
