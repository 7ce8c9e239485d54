"""Batched forward passes over variable-length token sequences (right padding, token-budget batches)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

DEFAULT_BATCH_TOKENS = 2048


def length_batches(lengths: list[int], batch_tokens: int = DEFAULT_BATCH_TOKENS) -> Iterator[list[int]]:
    """Indices grouped into batches whose padded size (rows × longest) stays within batch_tokens, longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) + 1) * lengths[batch[0]] > batch_tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def pad_right(seqs: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = s
        mask[r, : len(s)] = 1
    return ids, mask


@torch.no_grad()
def logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log-softmax over the vocabulary at every position, float32, on the CPU: [B, L, V]."""
    device = next(model.parameters()).device
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    return torch.log_softmax(out.float(), dim=-1).cpu()
