"""One candidate's row of a SmolLM2-135M quality table: `lowbit eval` against a reference record (KL on its
prompts, perplexity on WikiText-2 windows), the record made on the first call and reused after."""

from __future__ import annotations

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
