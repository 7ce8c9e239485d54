"""What static KV-cache scales (one k_scale and one v_scale per layer, calibrated once: what vLLM reads from a
compressed-tensors checkpoint) cost against lowbit's dynamic ones (one scale per token and head), on SmolLM2-135M.

Only the KV cache is quantized (fp8 E4M3, `--parts kv_cache`), so the difference is the scales' alone. Static
scales are calibrated on the calibration set (C4 documents 0–511; --samples windows of --seqlen tokens). Both
candidates are read by the same `lowbit eval` against one reference record.

    .venv/bin/python benchmarks/kv_static.py [--record out/bench/ct/reference.safetensors] [--max-prompts 160]
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from lowbit.eval.runner import EvalConfig, evaluate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", default="out/bench/ct/reference.safetensors")
    p.add_argument("--max-prompts", type=int, default=160)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--out", default="out/bench/kv")
    args = p.parse_args()
    out = Path(args.out)
    record = Path(args.record)
    rows = {}
    for name, extra in (("dynamic (per token and head)", []), ("static (per layer, calibrated)", ["--kv-static"])):
        d = out / ("static" if extra else "dynamic")
        if not d.exists():
            subprocess.run([str(ROOT / ".venv" / "bin" / "lowbit"), "quantize", "smollm2-135m", "--parts", "kv_cache",
                            "--kv-cache", "fp8", *extra, "--calib-samples", str(args.samples), "--calib-seqlen",
                            str(args.seqlen), "--out", str(d), "--quiet"], check=True)
        r = evaluate(EvalConfig(reference="smollm2-135m", candidate=str(d), kl=True, max_prompts=args.max_prompts,
                                reference_record=str(record) if record.exists() else None,
                                save_reference=None if record.exists() else str(record), progress=False))
        rows[name] = r["kl"]
    print(f"fp8 KV cache only, SmolLM2-135M, {args.max_prompts} prompts")
    print(f"{'scales':32}{'KL prefill':>12}{'95% CI':>20}{'KL gen':>10}{'95% CI':>20}{'rej gen':>9}")
    for name, kl in rows.items():
        pre, gen = kl["prefill"], kl["generation"]
        print(f"{name:32}{pre['mean']:12.5f}{[round(x, 5) for x in pre['ci95']]!s:>20}{gen['mean']:10.5f}"
              f"{[round(x, 5) for x in gen['ci95']]!s:>20}{gen['token_rejection_rate']:9.4f}")


if __name__ == "__main__":
    main()
