"""One candidate's row of a SmolLM2-135M quality table: `lowbit eval` against a reference record (KL on its
prompts, perplexity on WikiText-2 windows), the record made on the first call and reused after."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from lowbit.eval.runner import EvalConfig, evaluate


def eval_row(candidate: str | Path, record: Path, max_prompts: int, windows: int) -> dict:
    """KL prefill/generation means and 95% CIs, generation token rejection rate, and perplexity (candidate,
    reference) of `candidate` against the built-in SmolLM2-135M."""
    cfg = EvalConfig(reference="smollm2-135m", candidate=str(candidate), kl=True, ppl=("wikitext2",),
                     max_prompts=max_prompts, max_windows=windows, max_new_tokens=256,
                     reference_record=str(record) if record.exists() else None,
                     save_reference=None if record.exists() else str(record), progress=False)
    r = evaluate(cfg)
    kl, ppl = r["kl"], r["ppl"]["wikitext2"]
    return {"kl_prefill": kl["prefill"]["mean"], "kl_prefill_ci": kl["prefill"]["ci95"],
            "kl_generation": kl["generation"]["mean"], "kl_generation_ci": kl["generation"]["ci95"],
            "rejection_generation": kl["generation"]["token_rejection_rate"],
            "ppl": ppl["candidate"], "ppl_reference": ppl["reference"]}


def ci_text(ci) -> str:
    """A 95% interval as the tables print it."""
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def cached_rows(files: dict[str, tuple[Path, Callable[[Path], None]]], score: Callable[[Path], dict], suffix: str,
                time_key: str) -> dict[str, dict]:
    """Each file's row: made by its callable if missing (timed under `time_key`), scored, with its size, and cached
    beside it as FILE`suffix` — a row is made and scored once; delete the cache file to redo it."""
    rows = {}
    for label, (path, make) in files.items():
        cached = path.with_suffix(suffix)
        if cached.exists():
            rows[label] = json.loads(cached.read_text())
            continue
        t = time.perf_counter()
        if not path.exists():
            make(path)
        seconds = time.perf_counter() - t
        rows[label] = score(path) | {time_key: seconds, "mb": path.stat().st_size / 1e6}
        cached.write_text(json.dumps(rows[label]))
        print(label, json.dumps(rows[label]), flush=True)
    return rows
