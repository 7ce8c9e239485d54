"""lowbit's GPTQ against llm-compressor's on SmolLM2-135M: same calibration ids, same evaluation, wall time.

lowbit runs its calibration forward passes in its default compute dtype (bfloat16 on a CPU with AVX512-BF16,
float32 statistics); llm-compressor runs the model as loaded: float32, this checkpoint's dtype, as a user would get
it. A second llm-compressor run with the model loaded in bfloat16 is shown too (--no-llmc-bf16 to skip it).

Both quantize w4a16, symmetric, groups of 64, act-order with static groups (llm-compressor's default),
dampening 0.01, lazy batches of 128, lm_head left in 16 bits, on this machine's CPU, from the same calibration
windows (C4 sample, lowbit's drawing, saved to a file that llm-compressor reads). Each run is timed end to end
as a user would see it (a fresh process: load, calibrate, quantize, save). Both results are then evaluated by
`lowbit eval` against one reference record (KL on MT-bench/Vicuna-bench generations, WikiText-2 perplexity).

llm-compressor lives in its own environment (.venv-llmcompressor, created here on first use: torch==2.13.0
first, then llmcompressor==0.14.0.1); it is never a dependency of lowbit.

    .venv/bin/python benchmarks/llmcompressor_gptq.py [--samples 64] [--seqlen 512] [--max-prompts 80]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import lowbit
from lowbit.data.calibration import CalibConfig, calibration_ids
from lowbit.eval.runner import EvalConfig, evaluate
from lowbit.model.loading import builtin_checkpoint

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-llmcompressor"


def ensure_env() -> Path:
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        for pkg in ("torch==2.13.0", "llmcompressor==0.14.0.1"):
            subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", pkg], check=True)
    return py


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-prompts", type=int, default=80)
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--out", default="out/bench/llmcompressor")
    p.add_argument("--no-llmc-bf16", action="store_true", help="skip the llm-compressor run in bfloat16")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = ensure_env()
    model_dir = builtin_checkpoint("smollm2-135m")
    tok = lowbit.load_tokenizer("smollm2-135m")
    ids = calibration_ids(tok, CalibConfig("c4", args.samples, args.seqlen))
    torch.save(ids, out / "calib_ids.pt")

    lowbit_dir, llmc_dir = out / "lowbit-gptq", out / "llmcompressor-gptq"
    t_lowbit = timed([str(ROOT / ".venv" / "bin" / "lowbit"), "quantize", "smollm2-135m", "--method", "gptq",
                      "--scheme", "w4a16", "--group-size", "64", "--act-order", "--calib-samples", str(args.samples),
                      "--calib-seqlen", str(args.seqlen), "--device", "cpu", "--out", str(lowbit_dir), "--overwrite",
                      "--quiet"])
    worker = [str(py), str(ROOT / "benchmarks" / "_llmcompressor_worker.py"), "--model", str(model_dir),
              "--ids", str(out / "calib_ids.pt")]
    runs = {"lowbit": (lowbit_dir, t_lowbit), "llm-compressor": (llmc_dir, timed([*worker, "--out", str(llmc_dir)]))}
    if not args.no_llmc_bf16:
        bf16_dir = out / "llmcompressor-gptq-bf16"
        runs["llm-compressor bf16"] = (bf16_dir, timed([*worker, "--dtype", "bfloat16", "--out", str(bf16_dir)]))

    record = out / "reference.safetensors"
    rows = {}
    for name, (cand, _) in runs.items():
        cfg = EvalConfig(reference="smollm2-135m", candidate=str(cand), kl=True, ppl=("wikitext2",),
                         max_prompts=args.max_prompts, max_windows=args.windows, max_new_tokens=256,
                         reference_record=str(record) if record.exists() else None, save_reference=str(record),
                         progress=False)
        r = evaluate(cfg)
        kl, ppl = r["kl"], r["ppl"]["wikitext2"]
        rows[name] = {"kl_prefill": kl["prefill"]["mean"], "kl_generation": kl["generation"]["mean"],
                      "rejection_generation": kl["generation"]["token_rejection_rate"],
                      "ppl": ppl["candidate"], "ppl_reference": ppl["reference"]}
    for name, (_, seconds) in runs.items():
        rows[name]["wall_s"] = seconds
    print(json.dumps(rows, indent=1))
    a = rows["lowbit"]
    print(f"\ncalibration: {args.samples} x {args.seqlen} C4 tokens; evaluation: {args.max_prompts} prompts, "
          f"{args.windows} WikiText-2 windows")
    print(f"{'':20}{'KL prefill':>12}{'KL gen':>10}{'ppl':>9}{'wall s':>9}")
    for name, r in rows.items():
        print(f"{name:20}{r['kl_prefill']:12.4f}{r['kl_generation']:10.4f}{r['ppl']:9.3f}{r['wall_s']:9.1f}")
    for name, b in rows.items():
        if name != "lowbit":
            print(f"ratio lowbit/{name}: KL prefill {a['kl_prefill'] / b['kl_prefill']:.3f}, KL generation "
                  f"{a['kl_generation'] / b['kl_generation']:.3f}, ppl {a['ppl'] / b['ppl']:.4f}, "
                  f"wall time {a['wall_s'] / b['wall_s']:.3f}")


if __name__ == "__main__":
    main()
