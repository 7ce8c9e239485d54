"""`lowbit demo`: quantize the built-in model (RTN w4a16, groups of 64), save, reload, and compare."""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

from lowbit import api
from lowbit.data.datasets import wikitext2_test_text
from lowbit.errors import LowbitError
from lowbit.model.builtin import cache_dir
from lowbit.recipe import Recipe

MODEL = "smollm2-135m"
PROMPT = "What is the capital of France, and why is it famous?"
WINDOW = 512
FALLBACK_TEXT = ("The quick brown fox jumps over the lazy dog. " * 64).strip()


@torch.no_grad()
def compare_on_text(reference, candidate, ids: torch.Tensor) -> dict:
    """Mean full-vocabulary KL(ref ‖ cand) and top-1 agreement over one window of tokens."""
    p = torch.log_softmax(reference(ids).logits.float(), -1)
    q = torch.log_softmax(candidate(ids).logits.float(), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    same_top = (p.argmax(-1) == q.argmax(-1)).float().mean().item()
    return {"tokens": ids.numel(), "kl": kl.mean().item(), "same_top": same_top}


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, tokens: int = 24) -> str:
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run_demo(out: str | None = None, quiet: bool = False) -> int:
    from lowbit.cli import print_summary

    out_dir = Path(out) if out else cache_dir() / "demo" / f"{MODEL}-rtn-w4a16-g64"
    print(f"lowbit demo: RTN w4a16 with groups of 64 on the built-in {MODEL}; checkpoint in {out_dir}\n")
    tokenizer = api.load_tokenizer(MODEL)
    reference = api.load(MODEL)
    recipe = Recipe(method="rtn", scheme="w4a16", group_size=64)
    result = api.quantize(copy.deepcopy(reference), recipe, device="cpu", progress=not quiet)
    result.source = MODEL
    header = api.save(result, out_dir, tokenizer=tokenizer, overwrite=True)
    print_summary(result, header, out_dir)

    t = time.perf_counter()
    quantized = api.load(out_dir)
    print(f"\nreloaded the checkpoint in {time.perf_counter() - t:.1f} s (packed weights, dequantized on the fly)")
    try:
        text, source = wikitext2_test_text(), "WikiText-2 test"
    except LowbitError:
        text, source = FALLBACK_TEXT, "a built-in text (no data folder found)"
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[:, :WINDOW]
    stats = compare_on_text(reference, quantized, ids)
    print(f"against the 16-bit reference on the first {stats['tokens']} tokens of {source}: mean KL "
          f"{stats['kl']:.4f} nats, same top token at {100 * stats['same_top']:.1f}% of positions")
    print(f"\nprompt:    {PROMPT}")
    print(f"reference: {greedy(reference, tokenizer, PROMPT)}")
    print(f"quantized: {greedy(quantized, tokenizer, PROMPT)}")
    sys.stdout.flush()
    return 0
