"""A served reference (`--reference openai+http://…/v1#MODEL`): its record, made through the completions API.

1. The prompts are tokenized here, by `--tokenizer` with its chat template, as for a local reference
   (lowbit.eval.prompts.encode_prompts).
2. The reference continues each prompt greedily through the API (lowbit.eval.served.generate, lowbit.eval.complete).
3. Each whole sequence is teacher-forced through the same API (lowbit.eval.served.teacher_force, asking for k =
   `--top-n`); per position, the server's top-k log-probs and its log-prob of the next token become the record's
   top-N, N = the k the server gave. Requests, retries, concurrency and the cache are the served candidate's.

The record is sparse. Each row holds the k most likely ids the server returned, padded with id −1 and log-prob −inf
where fewer came back (an entry whose text names no one id is left out, lowbit.eval.token_text). A position the
server did not return (llama-cpp-python's first echoed token: position 0, right after BOS), or whose most likely
token it named by such a text (the top-1 is unknown there), is a hole: every id −1, `next_logprob` NaN.
lowbit.eval.divergence leaves holes out of every statistic and counts them. The meta says where the record came from
(`served`: the API's URL, the model's name, k; never the API key) and that it is `sparse`.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from lowbit.eval import echo
from lowbit.eval.divergence import record_meta
from lowbit.eval.endpoint import Endpoint
from lowbit.eval.prompts import encode_prompts
from lowbit.eval.record import ReferenceRecord
from lowbit.eval.served import ServedOptions, generate, teacher_force
from lowbit.model.sources import SERVED_PREFIX

SERVED_REFERENCE_DEFINITION = (
    "the reference is a served model: it generated greedily through the completions API, and per position its top-k "
    "log-probs (k = kl.top_n) and its log-prob of the next token came back through the same API with echo. KL over "
    "the reference's top-k ids (for a served candidate, those of them it returned too), both distributions "
    "renormalized over them; rejection: the candidate's most likely token differs from the reference's top-1. "
    "Positions the reference's server did not return (llama-cpp-python: position 0, after BOS), or whose most likely "
    "token it named by a text no one id has, are left out and counted (positions_not_in_reference).")


def served_record(endpoint: Endpoint, tokenizer, prompts: list[str], *, source: str, max_new_tokens: int,
                  top_n: int, options: ServedOptions) -> tuple[ReferenceRecord, dict]:
    """The record of a served reference on `prompts` (see the module's docstring), and how the run went (requests,
    answers from the cache, seconds: of the generation and of the teacher forcing)."""
    start = time.perf_counter()
    prompt_ids = encode_prompts(tokenizer, prompts)
    generated = generate(prompt_ids, tokenizer, endpoint, options, max_new_tokens)
    seqs = [g.ids for g in generated.generations]
    base = record_meta(tokenizer, len(tokenizer), top_n, max_new_tokens, source, len(prompts))
    bare = ReferenceRecord.of_sequences({"model": str(endpoint), **base}, seqs, [len(p) for p in prompt_ids])
    forced = teacher_force(bare, tokenizer, endpoint, dataclasses.replace(options, top_k=top_n))
    k = forced.info["top_k"]
    top_ids, top_logprobs, next_logprob, holes = sparse_predictions(forced.answers, k)
    info = forced.info
    served = {"url": info["url"], "model": info["model"], "top_k": k, "top_k_asked": top_n,
              "prompt_as": info["prompt_as"], "generation": {key: generated.info[key] for key in
                                                             ("protocol", "stopped", "tokens_as", "count_differs")},
              "protocol": info["protocol"], **holes}
    meta = {**bare.meta, "model": f"{SERVED_PREFIX}{info['url']}#{info['model']}", "top_n": k, "sparse": True,
            "served": served, "truncated_prompts": 0, "generation_seconds": round(time.perf_counter() - start, 2)}
    run = {name: {key: x[key] for key in ("requests", "sequences_from_cache", "seconds", "cache")}
           for name, x in (("generation", generated.info), ("teacher_forcing", info))}
    return dataclasses.replace(bare, meta=meta).with_predictions(top_ids, top_logprobs, next_logprob), run


def sparse_predictions(answers: list[echo.Answer], k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """The record's top-k ids [positions, k] (−1 padded), their log-probs (−inf padded) and the next token's log-prob
    (NaN at holes) from the served answers, one per sequence; and the counts of holes and short rows."""
    ids, lps, nxt = [], [], []
    counts = {"positions_not_returned": 0, "positions_top_unknown": 0, "positions_fewer_than_k": 0}
    for a in answers:
        n, w = len(a.returned), min(k, a.ids.shape[1])
        row_ids = np.full((n, k), -1, dtype=np.int32)
        row_lps = np.full((n, k), -np.inf, dtype=np.float32)
        row_ids[:, :w], row_lps[:, :w] = a.ids[:, :w], a.logprobs[:, :w]  # rows are sorted, most likely first
        unknown = a.returned & (a.hidden_logprob > a.logprobs.max(-1))
        hole = ~a.returned | unknown
        row_ids[hole], row_lps[hole] = -1, -np.inf
        following = np.where(hole, np.nan, a.next_logprob).astype(np.float32)
        counts["positions_not_returned"] += int((~a.returned).sum())
        counts["positions_top_unknown"] += int(unknown.sum())
        counts["positions_fewer_than_k"] += int(((row_ids >= 0).sum(-1) < k)[~hole].sum())
        ids.append(row_ids)
        lps.append(row_lps)
        nxt.append(following)
    return (torch.from_numpy(np.concatenate(ids)), torch.from_numpy(np.concatenate(lps)),
            torch.from_numpy(np.concatenate(nxt)), counts)
