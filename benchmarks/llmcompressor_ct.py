"""lowbit's GPTQ and AWQ against llm-compressor's, w4a16 groups of 64 on SmolLM2-135M, every candidate a checkpoint on
disk read by the same `lowbit eval`: lowbit's own checkpoints, lowbit's compressed-tensors exports of them, and the
compressed-tensors directories llm-compressor saves (read into lowbit's packed runtime).

It also checks the reader: each llm-compressor directory is loaded by transformers (compressed-tensors decompresses
it), saved as a plain float directory and evaluated too; its KL must equal the one lowbit's reader gives.

llm-compressor lives in its own environment (.venv-llmcompressor: torch==2.13.0 first, then llmcompressor==0.14.0.1);
it is never a dependency of lowbit. Calibration: the same C4 windows for every run (lowbit's drawing).

    .venv/bin/python benchmarks/llmcompressor_ct.py [--samples 64] [--seqlen 512] [--max-prompts 160] [--windows 10]
        [--methods gptq,awq] [--exports] [--reader-check gptq]

Each candidate's evaluation of 160 prompts takes about 8 minutes on 2 CPU cores, so the rows that only confirm what
the tests already pin (lowbit's compressed-tensors exports: logits identical to the checkpoint's) are opt-in.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from _eval_row import eval_row

import lowbit
from lowbit.data.calibration import CalibConfig, calibration_ids
from lowbit.model.loading import builtin_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from llmcompressor_gptq import ensure_env, timed  # noqa: E402


def transformers_copy(ct_dir: Path, out: Path) -> Path:
    """The weights transformers (with compressed-tensors) makes of a compressed directory, saved as float."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if out.exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(ct_dir, dtype=torch.float32)
    with torch.no_grad():
        model(torch.tensor([[1, 2]]))  # the first forward decompresses
    out.mkdir(parents=True)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()
             if not k.endswith(("_scale", "_zero_point", "_shape", "_packed"))}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((ct_dir / "config.json").read_text())
    config.pop("quantization_config")
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for f in ct_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-prompts", type=int, default=160)
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--out", default="out/bench/ct")
    p.add_argument("--methods", default="gptq,awq", help="comma-separated: gptq, awq")
    p.add_argument("--exports", action="store_true", help="also evaluate lowbit's compressed-tensors exports")
    p.add_argument("--reader-check", default="gptq",
                   help="comma-separated methods whose llm-compressor directory is also evaluated via transformers")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = ensure_env()
    model_dir = builtin_checkpoint("smollm2-135m")
    tok = lowbit.load_tokenizer("smollm2-135m")
    ids = calibration_ids(tok, CalibConfig("c4", args.samples, args.seqlen))
    torch.save(ids, out / "calib_ids.pt")
    lowbit_cli = str(ROOT / ".venv" / "bin" / "lowbit")
    calib = ["--calib-samples", str(args.samples), "--calib-seqlen", str(args.seqlen), "--device", "cpu", "--quiet"]
    runs: dict[str, tuple[Path, float | None]] = {}
    for method, extra in (("gptq", ["--act-order"]), ("awq", [])):
        if method not in args.methods.split(","):
            continue
        d = out / f"lowbit-{method}"
        if not d.exists():
            runs[f"lowbit {method}"] = (d, timed([lowbit_cli, "quantize", "smollm2-135m", "--method", method,
                                                  "--scheme", "w4a16", "--group-size", "64", *extra, *calib,
                                                  "--out", str(d)]))
        else:
            runs[f"lowbit {method}"] = (d, None)
        if args.exports:
            ct = out / f"lowbit-{method}-ct"
            if not ct.exists():
                subprocess.run([lowbit_cli, "export", str(d), "--to", "compressed-tensors", "--out", str(ct)],
                               check=True)
            runs[f"lowbit {method} → compressed-tensors"] = (ct, None)
        llmc = out / f"llmcompressor-{method}"
        seconds = None
        if not llmc.exists():
            seconds = timed([str(py), str(ROOT / "benchmarks" / "_llmcompressor_worker.py"), "--model",
                             str(model_dir), "--ids", str(out / "calib_ids.pt"), "--method", method, "--compressed",
                             "--out", str(llmc)])
        if seconds is None and (llmc / "llmcompressor.json").exists():
            seconds = json.loads((llmc / "llmcompressor.json").read_text())["seconds"]
        runs[f"llm-compressor {method}"] = (llmc, seconds)
        if method in args.reader_check.split(","):
            runs[f"llm-compressor {method} via transformers"] = (transformers_copy(llmc, out / f"{llmc.name}-tf"),
                                                                 None)

    record = out / "reference.safetensors"
    rows = {}
    for name, (cand, seconds) in runs.items():
        cached = out / f"{cand.name}.eval.json"  # a row is evaluated once; delete the file to redo it
        if cached.exists():
            rows[name] = json.loads(cached.read_text())
            rows[name]["wall_s"] = seconds or rows[name]["wall_s"]
            continue
        rows[name] = eval_row(cand, record, args.max_prompts, args.windows) | {"wall_s": seconds}
        cached.write_text(json.dumps(rows[name]))
        print(name, json.dumps(rows[name]), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    ref_ppl = next(iter(rows.values()))["ppl_reference"]
    print(f"\ncalibration {args.samples} x {args.seqlen} C4 tokens; KL on {args.max_prompts} prompts; "
          f"perplexity on {args.windows} WikiText-2 windows of 2048 (reference {ref_ppl:.3f})")
    print(f"{'candidate':44}{'KL prefill':>11}{'KL gen':>9}{'rej gen':>9}{'ppl':>9}{'wall s':>8}")
    for name, r in rows.items():
        wall = f"{r['wall_s']:.0f}" if r["wall_s"] else ""
        print(f"{name:44}{r['kl_prefill']:11.4f}{r['kl_generation']:9.4f}{r['rejection_generation']:9.4f}"
              f"{r['ppl']:9.3f}{wall:>8}")
    for method in set(args.methods.split(",")) & set(args.reader_check.split(",")):
        a, b = rows[f"llm-compressor {method}"], rows[f"llm-compressor {method} via transformers"]
        print(f"reader check, llm-compressor {method}: KL prefill lowbit {a['kl_prefill']:.6f} vs transformers "
              f"{b['kl_prefill']:.6f}; generation {a['kl_generation']:.6f} vs {b['kl_generation']:.6f}")


if __name__ == "__main__":
    main()
