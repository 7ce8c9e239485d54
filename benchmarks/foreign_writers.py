"""GPTQ- and AWQ-format checkpoints written by a real writer (GPTQModel), read by lowbit.

GPTQModel quantizes stories260K's attention layers into each layout (GPTQ v1 and v2, act-order, 3/4/8 bits, AWQ
GEMM). For each checkpoint, on the same WikiText-2 windows:
- `lowbit eval --kl-text` with the checkpoint as candidate (lowbit's reader);
- the logits GPTQModel's own torch kernels give for the same checkpoint, against lowbit's (relative difference),
  and the exact full-vocabulary KL to the float model computed the same way from both;
- each layer's weight as GPTQModel dequantizes it, against lowbit's codes, scales and zero points put through
  GPTQModel's arithmetic (bfloat16 scales and products): identical or not. The logits differ by GPTQModel's
  bfloat16 compute; lowbit's reader computes in float32.

GPTQModel lives in its own environment (.venv-gptqmodel: torch==2.13.0 first, then gptqmodel==7.6.0, the last
release that accepts torch 2.13; GPTQMODEL_VENV overrides); it is never a dependency of lowbit.

    .venv/bin/python benchmarks/foreign_writers.py [--windows 2] [--out out/bench/writers]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

import lowbit
from lowbit.eval.perplexity import windows
from lowbit.eval.runner import EvalConfig, evaluate
from lowbit.formats import QuantizedWeight
from lowbit.io.checkpoint import quantized_layers

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260K"
WORKER = ROOT / "benchmarks" / "_gptqmodel_worker.py"
CASES = {  # name: worker arguments
    "gptq v1 w4 g32 act-order sym": ["--method", "gptq", "--fmt", "gptq", "--bits", "4", "--desc-act", "1"],
    "gptq v1 w4 g32 asym": ["--method", "gptq", "--fmt", "gptq", "--bits", "4", "--desc-act", "0", "--sym", "0"],
    "gptq_v2 w4 g32 act-order asym": ["--method", "gptq", "--fmt", "gptq_v2", "--bits", "4", "--desc-act", "1",
                                      "--sym", "0"],
    "gptq v1 w3 g32 act-order sym": ["--method", "gptq", "--fmt", "gptq", "--bits", "3", "--desc-act", "1"],
    "gptq v1 w8 g64 act-order sym": ["--method", "gptq", "--fmt", "gptq", "--bits", "8", "--group-size", "64",
                                     "--desc-act", "1"],
    "awq gemm w4 g32": ["--method", "awq", "--fmt", "gemm", "--bits", "4", "--sym", "0"],
}


def ensure_env() -> Path:
    venv = Path(os.environ.get("GPTQMODEL_VENV", ROOT / ".venv-gptqmodel"))
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        for pkg in (["torch==2.13.0"], ["gptqmodel==7.6.0", "torch==2.13.0"]):
            subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pkg], check=True)
    return py


def full_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(P_ref ‖ Q) over the whole vocabulary."""
    p, q = ref_logits.double().log_softmax(-1), logits.double().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--out", default="out/bench/writers")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = ensure_env()
    tok = lowbit.load_tokenizer(STORIES)
    wins = windows(tok, "wikitext2", 512, args.windows)
    torch.save(wins, out / "ids.pt")
    reference = lowbit.load(STORIES)
    with torch.no_grad():
        ref_logits = torch.cat([reference(w.unsqueeze(0)).logits for w in wins])
    print(f"{'checkpoint':32}{'lowbit eval KL':>16}{'KL lowbit':>11}{'KL GPTQModel':>14}{'rel Δ logits':>14}"
          f"{'ŵ identical':>13}")
    for name, extra in CASES.items():
        d = out / name.replace(" ", "-")
        if not d.exists():
            subprocess.run([str(py), str(WORKER), "quantize", str(d), "--source", str(STORIES), *extra], check=True,
                           capture_output=True)
        theirs_file = d.parent / f"{d.name}.logits.pt"
        subprocess.run([str(py), str(WORKER), "logits", str(d), str(out / "ids.pt"), str(theirs_file), "--kind",
                        extra[1]], check=True, capture_output=True)
        got = torch.load(theirs_file)
        theirs = got["logits"]
        ours_model = lowbit.load(d)
        same = True  # GPTQModel dequantizes in bfloat16 (scales cast to it, then (c − z)·s rounded to it), [in, out]
        for n, m in quantized_layers(ours_model).items():
            qw = m.quantized_weight()
            ours_bf16 = QuantizedWeight(qw.fmt, qw.codes, qw.scale.to(torch.bfloat16), qw.zero, qw.g_idx)
            same &= torch.equal(ours_bf16.dequantize().to(torch.bfloat16).float(), got["weights"][n].t())
        with torch.no_grad():
            ours = torch.cat([ours_model(w.unsqueeze(0)).logits for w in wins])
        r = evaluate(EvalConfig(reference=str(STORIES), candidate=str(d), kl_text=("wikitext2",),
                                max_windows=args.windows, progress=False))
        rel = ((ours - theirs).norm() / theirs.norm()).item()
        print(f"{name:32}{r['kl_text']['wikitext2']['all']['mean_full']:16.5f}{full_kl(ref_logits, ours):11.5f}"
              f"{full_kl(ref_logits, theirs):14.5f}{rel:14.2e}{'yes' if same else 'NO':>13}", flush=True)


if __name__ == "__main__":
    main()
