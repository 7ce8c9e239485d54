"""Perplexity with the GPTQ paper's protocol, and llama.cpp's ln(PPL(Q)/PPL(ref)) with its uncertainty.

The corpus is joined (lowbit.data.datasets.evaluation_text), tokenized once, cut into non-overlapping windows
of `seqlen` tokens (the last partial window dropped); PPL = exp(mean next-token NLL over every predicted token).
ln(PPL(Q)/PPL(ref)) = mean over tokens of NLL_Q − NLL_ref; its uncertainty is the standard error of that mean,
as llama-perplexity prints it (tokens treated as independent).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.data.datasets import evaluation_text
from lowbit.errors import LowbitError

DEFAULT_SEQLEN = 2048


def windows(tokenizer, dataset: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Token windows [n, seqlen] of a corpus."""
    ids = torch.tensor(tokenizer(evaluation_text(dataset), verbose=False)["input_ids"], dtype=torch.long)
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise LowbitError(f"{dataset} has {ids.numel()} tokens: not one window of {seqlen}. Lower the sequence length.")
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def token_nll(model: nn.Module, wins: torch.Tensor, desc: str = "perplexity", progress: bool = True) -> torch.Tensor:
    """Next-token NLL at every predicted position: [n, seqlen − 1], float32."""
    device = next(model.parameters()).device
    out = []
    for w in tqdm(wins, desc=desc, unit="window", disable=not progress, dynamic_ncols=True):
        logits = model(input_ids=w.unsqueeze(0).to(device), use_cache=False).logits[0, :-1].float()
        out.append(torch.nn.functional.cross_entropy(logits, w[1:].to(device), reduction="none").cpu())
    return torch.stack(out)


def ppl(nll: torch.Tensor) -> float:
    return math.exp(nll.double().mean().item())


def compare_ppl(ref_nll: torch.Tensor, cand_nll: torch.Tensor) -> dict:
    d = (cand_nll.double() - ref_nll.double()).flatten().numpy()
    stderr = float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return {"ln_ratio": float(d.mean()), "ln_ratio_stderr": stderr, "ratio": math.exp(float(d.mean()))}
