"""RTN vs GPTQ vs SpQR on SmolLM2-135M: bits per weight, WikiText-2 perplexity, KL and token rejection.

Settings (issue 4): RTN and GPTQ at w4a16 g64, w4a16 per channel, w3a16 g64, w3a16 per channel, w2a16 g32
(symmetric; GPTQ with act-order and static groups), and the SpQR presets spqr-near-lossless and spqr-3bit.
Calibration for GPTQ and SpQR: windows of the C4 sample (documents 0–511), lowbit's drawing, seed 0.
Evaluation: `lowbit eval`'s KL on reference generations (MT-bench + Vicuna-bench first turns, 256 new tokens;
the first --max-prompts) and perplexity on the first --windows WikiText-2 windows of 2048 tokens, all against
one reference record. Each configuration's result goes to OUT/NAME.json (reused when present), then a markdown
table is printed.

    .venv/bin/python benchmarks/gptq_spqr_table.py [--samples 64] [--seqlen 512] [--max-prompts 80]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import lowbit
from lowbit import api
from lowbit.data.calibration import CalibConfig
from lowbit.eval.runner import EvalConfig, evaluate
from lowbit.recipe import Recipe


def configs() -> dict[str, Recipe]:
    settings = {"w4a16 g64": ("w4a16", 64), "w4a16 per-channel": ("w4a16", 0), "w3a16 g64": ("w3a16", 64),
                "w3a16 per-channel": ("w3a16", 0), "w2a16 g32": ("w2a16", 32)}
    out = {}
    for label, (scheme, group) in settings.items():
        out[f"RTN {label}"] = Recipe(method="rtn", scheme=scheme, group_size=group)
        out[f"GPTQ {label}"] = Recipe(method="gptq", scheme=scheme, group_size=group,
                                               options={"act_order": True})
    for label, (scheme, group) in {"w4a16 g64": ("w4a16", 64), "w3a16 g64": ("w3a16", 64)}.items():
        out[f"RTN {label} restricted"] = Recipe(method="rtn", scheme=scheme, group_size=group, full_range=False)
    out["SpQR near-lossless"] = Recipe.preset("spqr-near-lossless")
    out["SpQR 3-bit"] = Recipe.preset("spqr-3bit")
    return out


def table_args(description: str, out: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-prompts", type=int, default=80, help="the first N prompts of the record")
    p.add_argument("--windows", type=int, default=20, help="WikiText-2 perplexity windows (0: no perplexity)")
    p.add_argument("--record", default="out/bench/llmcompressor/reference.safetensors")
    p.add_argument("--out", default=out)
    p.add_argument("--only", help="comma-separated configuration names")
    p.add_argument("--tasks", default="", help="comma-separated zero-shot tasks to add (e.g. arc_easy)")
    p.add_argument("--limit", type=int, default=None, help="tasks: an evenly spaced subset of N items")
    return p.parse_args()


def evaluate_row(name: str, candidate: Path, bits: float | None, seconds: float, args: argparse.Namespace,
                 tasks: tuple[str, ...] = ()) -> dict:
    """One table row: KL (prefill, generation), rejection rates and WikiText-2 perplexity of a candidate."""
    r = evaluate(EvalConfig(reference="smollm2-135m", candidate=str(candidate), kl=True,
                            ppl=("wikitext2",) if args.windows else (), tasks=tasks, limit=args.limit,
                            max_prompts=args.max_prompts, max_windows=args.windows, reference_record=args.record,
                            progress=False))
    kl, ppl = r["kl"], (r.get("ppl") or {}).get("wikitext2") or {}
    row = {"name": name, "bits_per_weight": bits, "ppl": ppl.get("candidate"),
           "ppl_reference": ppl.get("reference"), "kl_prefill": kl["prefill"]["mean"],
           "kl_prefill_ci95": kl["prefill"]["ci95"], "kl_generation": kl["generation"]["mean"],
           "kl_generation_ci95": kl["generation"]["ci95"],
           "rejection_prefill": kl["prefill"]["token_rejection_rate"],
           "rejection_generation": kl["generation"]["token_rejection_rate"], "quantize_s": round(seconds, 1)}
    for task, v in (r.get("tasks") or {}).items():
        row[f"task_{task}"] = v["candidate"]
        row[f"task_{task}_reference"] = v["reference"]
    return row


def run_table(recipes: dict[str, Recipe], args: argparse.Namespace) -> list[dict]:
    """Quantize and evaluate each configuration (results cached as OUT/NAME.json); returns the rows in order."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reference = lowbit.load("smollm2-135m")
    tok = lowbit.load_tokenizer("smollm2-135m")
    calib = CalibConfig("c4", args.samples, args.seqlen)
    wanted = set(args.only.split(",")) if args.only else None
    tasks = tuple(t for t in args.tasks.split(",") if t)
    for name, recipe in recipes.items():
        slug = name.lower().replace(" ", "-").replace("/", "-").replace("=", "")
        if (wanted and name not in wanted) or (out / f"{slug}.json").exists():
            continue
        ckpt = out / slug
        if (ckpt / "lowbit.json").exists():  # quantized by an earlier, interrupted run
            header = json.loads((ckpt / "lowbit.json").read_text())
            seconds, bits = header["seconds"], header["bits_per_weight"]
        else:
            t = time.perf_counter()
            needs = api.get_method(recipe.method).needs_calibration or recipe.act_static
            result = api.quantize(copy.deepcopy(reference), recipe, tokenizer=tok, calib=calib if needs else None,
                                  device="cpu", progress=False)
            seconds, bits = time.perf_counter() - t, result.sizes["bits_per_weight"]
            api.save(result, ckpt, tokenizer=tok, overwrite=True)
        row = evaluate_row(name, ckpt, bits, seconds, args, tasks)
        (out / f"{slug}.json").write_text(json.dumps(row))
        print(json.dumps(row), flush=True)
    rows = [json.loads(f.read_text()) for f in sorted(out.glob("*.json"))]
    order = list(recipes)
    rows = [r for r in rows if r["name"] in order]
    rows.sort(key=lambda r: order.index(r["name"]))
    return rows


def print_table(rows: list[dict]) -> None:
    task_cols = sorted({k for r in rows for k in r if k.startswith("task_") and not k.endswith("_reference")})
    head = ["configuration", "bits/weight", "WikiText-2 ppl", "KL prefill [95% CI]", "KL generation [95% CI]",
            "rejection prefill", "rejection generation", *[c.removeprefix("task_") for c in task_cols], "quantize s"]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    def ci(r: dict, k: str) -> str:
        return f"{r[k]:.4f} [{r[k + '_ci95'][0]:.4f}, {r[k + '_ci95'][1]:.4f}]"

    for r in rows:
        bits = f"{r['bits_per_weight']:.3f}" if r["bits_per_weight"] else "16"
        cells = [r["name"], bits, f"{r['ppl']:.2f}" if r["ppl"] else "–", ci(r, "kl_prefill"), ci(r, "kl_generation"),
                 f"{r['rejection_prefill']:.3f}", f"{r['rejection_generation']:.3f}",
                 *[f"{r[c]:.3f}" for c in task_cols], f"{r['quantize_s']:.0f}"]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    args = table_args(__doc__.splitlines()[0], "out/bench/table")
    print_table(run_table(configs(), args))


if __name__ == "__main__":
    main()
