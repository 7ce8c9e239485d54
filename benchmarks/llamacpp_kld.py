"""lowbit's GGUFs against llama.cpp's own quantizer, judged by llama.cpp itself: `llama-perplexity --kl-divergence`
against the F16 base on the first 40 windows of 2048 tokens of WikiText-2 test, SmolLM2-135M, with file sizes.

Every file is scored by the same llama-perplexity on the same text (the protocol's WikiText-2 test text: the Hugging
Face rows joined by blank lines), so the numbers are llama.cpp's arithmetic on what each file stores.

- The base: llama-quantize of the built-in GGUF (SmolLM2-135M-Instruct Q4_1: lowbit's float reference is that file
  dequantized) to F16. Its logits on the 40 windows are saved once (--kl-divergence-base, about 4 GB).
- llama.cpp's files: llama-quantize of the base to Q4_0, Q4_K_M and Q3_K_M, each without and with an importance
  matrix made by llama-imatrix on the C4 calibration documents (0–511 of the sample, the text lowbit calibrates on),
  --chunks × -c tokens (default 64 × 512).
- lowbit's files: `lowbit quantize smollm2-135m --method M --scheme MIX --format gguf`, M in imatrix (lowbit's
  RTN with importance), gptq, awq (and rtn), calibrated on the same C4 documents with the same token count. A
  method may carry lowbit flags after slashes: `gptq/act-order` adds `--act-order`.

The tools are built once by benchmarks/llamacpp_tools.py. Results are cached per file (FILE.kld.json); delete one
to redo it.

    .venv/bin/python benchmarks/llamacpp_kld.py [--mixes q4_0,q4_k_m,q3_k_m] [--methods imatrix,gptq,awq]
        [--chunks 40] [--ctx 2048] [--calib-chunks 64] [--calib-ctx 512] [--out out/bench/llamacpp-kld]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from _eval_row import cached_rows
from llamacpp_tools import tools

LLAMA_TYPE = {"q4_0": "Q4_0", "q4_k_m": "Q4_K_M", "q3_k_m": "Q3_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K",
              "q8_0": "Q8_0"}
STATS = {  # llama-perplexity's summary lines
    "kld": r"Mean\s+KLD:\s+([-\d.]+)\s+±\s+([\d.]+)",
    "kld_median": r"Median\s+KLD:\s+([-\d.]+)",
    "kld_99": r"99\.0%\s+KLD:\s+([-\d.]+)",
    "ppl": r"Mean PPL\(Q\)\s*:\s*([\d.]+)\s+±\s+([\d.]+)",
    "ppl_base": r"Mean PPL\(base\)\s*:\s*([\d.]+)",
    "same_top": r"Same top p:\s*([\d.]+)\s*±\s*([\d.]+)",
}


def run(cmd: list, log: Path) -> str:
    """Run a tool, keep its output in `log`, and fail with the tail of it."""
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    log.write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"{Path(cmd[0]).name} failed ({p.returncode}); see {log}:\n{(p.stdout + p.stderr)[-2000:]}")
    return p.stdout + p.stderr


def parse(text: str) -> dict:
    out = {}
    for key, pattern in STATS.items():
        m = re.search(pattern, text)
        if m is None:
            raise SystemExit(f"llama-perplexity printed no {key!r} line")
        out[key] = float(m.group(1))
        if m.lastindex == 2:
            out[key + "_pm"] = float(m.group(2))
    return out


def texts(out: Path) -> tuple[Path, Path]:
    """The evaluation text (WikiText-2 test, the protocol's) and the calibration text (C4 documents 0–511)."""
    from lowbit.data.datasets import calibration_texts, evaluation_text

    wiki, calib = out / "wikitext2-test.txt", out / "c4-calibration.txt"
    if not wiki.exists():
        wiki.write_text(evaluation_text("wikitext2"))
    if not calib.exists():
        calib.write_text("\n\n".join(calibration_texts("c4")))
    return wiki, calib


def main() -> None:
    from lowbit.model.builtin import builtin_gguf

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mixes", default="q4_0,q4_k_m,q3_k_m")
    p.add_argument("--methods", default="imatrix,gptq,awq")
    p.add_argument("--chunks", type=int, default=40)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--calib-chunks", type=int, default=64)
    p.add_argument("--calib-ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("out/bench/llamacpp-kld"))
    args = p.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    bins = tools()
    quantize, imatrix, perplexity = bins["llama-quantize"], bins["llama-imatrix"], bins["llama-perplexity"]
    threads = ["-t", args.threads]
    wiki, calib = texts(out)
    base = out / "base-f16.gguf"
    if not base.exists():
        run([quantize, "--allow-requantize", builtin_gguf("smollm2-135m"), base, "F16", args.threads],
            out / "base-f16.log")
    base_logits = out / f"base-{args.chunks}x{args.ctx}.kld"
    eval_args = ["-f", wiki, "-c", args.ctx, "--chunks", args.chunks, *threads]
    if not base_logits.exists():
        print("[bench] base logits (llama-perplexity --kl-divergence-base)", file=sys.stderr, flush=True)
        run([perplexity, "-m", base, *eval_args, "--kl-divergence-base", base_logits], out / "base-logits.log")
    imat = out / f"imatrix-c4-{args.calib_chunks}x{args.calib_ctx}.gguf"
    if not imat.exists():
        print("[bench] llama-imatrix", file=sys.stderr, flush=True)
        run([imatrix, "-m", base, "-f", calib, "-c", args.calib_ctx, "--chunks", args.calib_chunks, *threads,
             "-o", imat], out / "imatrix.log")

    files: dict[str, tuple[Path, list]] = {}
    for mix in args.mixes.split(","):
        t = LLAMA_TYPE[mix]
        files[f"llama.cpp {t}"] = (out / f"llama-{mix}.gguf", [quantize, base, "{dst}", t, args.threads])
        files[f"llama.cpp {t} + imatrix"] = (out / f"llama-{mix}-imatrix.gguf",
                                             [quantize, "--imatrix", imat, base, "{dst}", t, args.threads])
        for variant in filter(None, args.methods.split(",")):  # METHOD[/FLAG…]: gptq/act-order → --act-order
            method, *flags = variant.split("/")
            cmd = [sys.executable, "-m", "lowbit", "quantize", "smollm2-135m", "--method", method, "--scheme", mix,
                   *(f"--{f}" for f in flags), "--format", "gguf", "--out", "{dst}", "--quiet"]
            if method != "rtn":
                cmd += ["--calib", "c4", "--calib-samples", args.calib_chunks, "--calib-seqlen", args.calib_ctx]
            files[f"lowbit {variant} {mix}"] = (out / f"lowbit-{variant.replace('/', '-')}-{mix}.gguf", cmd)

    def make(cmd: list) -> Callable[[Path], None]:
        def run_it(path: Path) -> None:
            print(f"[bench] making {path.name}", file=sys.stderr, flush=True)
            run([str(c).replace("{dst}", str(path)) for c in cmd], path.with_suffix(".make.log"))
        return run_it

    def score(path: Path) -> dict:
        print(f"[bench] scoring {path.name}", file=sys.stderr, flush=True)
        return parse(run([perplexity, "-m", path, *eval_args, "--kl-divergence-base", base_logits, "--kl-divergence"],
                         path.with_suffix(".kld.log")))

    rows = cached_rows({label: (path, make(cmd)) for label, (path, cmd) in files.items()}, score, ".kld.json",
                       "make_s")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\nllama-perplexity --kl-divergence, {args.chunks} × {args.ctx} tokens of WikiText-2 test, base F16 "
          f"(ppl {next(iter(rows.values()))['ppl_base']:.3f}); calibration {args.calib_chunks} × {args.calib_ctx} C4")
    print(f"{'file':34}{'MB':>7}{'mean KLD':>10}{'±':>8}{'median':>9}{'99%':>8}{'same top':>10}{'ppl':>9}{'s':>6}")
    for name, r in rows.items():
        print(f"{name:34}{r['mb']:7.1f}{r['kld']:10.5f}{r['kld_pm']:8.5f}{r['kld_median']:9.5f}{r['kld_99']:8.4f}"
              f"{r['same_top']:9.2f}%{r['ppl']:9.3f}{r['make_s']:6.0f}")


if __name__ == "__main__":
    main()
