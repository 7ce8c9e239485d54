"""Divergence, the Fireworks way: the reference generates, the candidate is teacher-forced on the same tokens.

1. The reference generates to completion (greedy, KV cache, left-padded batches) from every prompt.
2. The reference is teacher-forced on the finished sequences; at every position (prompt = prefill, and generated)
   its top-N ids and log-probs are recorded, with its log-prob of the token that comes next (the record).
3. The candidate is teacher-forced on the same sequences, batched the same way, and compared position by
   position (lowbit.eval.stats). When the reference model is at hand, the exact full-vocabulary KL comes too.

Position t predicts token t+1. Positions before the last prompt token predict prompt tokens (prefill); from
the last prompt token on they predict generated tokens (generation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.eval.forward import DEFAULT_BATCH_TOKENS, length_batches, logprobs, pad_right
from lowbit.eval.prompts import encode_prompts
from lowbit.eval.record import ReferenceRecord, model_fingerprint, tokenizer_fingerprint
from lowbit.eval.stats import TokenStats, by_position, sparse_token_stats, summarize, token_stats
from lowbit.model.architectures import text_config

DEFAULT_TOP_N = 16
DEFAULT_MAX_NEW_TOKENS = 256
POSITION_BUCKET = 32
SHOWN_TOP = 3  # most likely tokens of each model kept per position, for the report's worst prompts
WORST_PROMPTS, WORST_TOKENS = 5, 400


def eos_ids(model: nn.Module, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
             batch_size: int = 16, progress: bool = True) -> list[torch.Tensor]:
    """Greedy continuations; returns prompt + generated tokens per prompt (up to and including EOS)."""
    device = next(model.parameters()).device
    stop = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    out: list[torch.Tensor | None] = [None] * len(prompt_ids)
    bar = tqdm(total=len(prompt_ids), desc="reference generates", unit="prompt", disable=not progress,
               dynamic_ncols=True)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        longest = max(len(prompt_ids[i]) for i in rows)
        ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(rows):
            ids[r, longest - len(prompt_ids[i]):] = torch.tensor(prompt_ids[i])
            mask[r, longest - len(prompt_ids[i]):] = 1
        result = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                max_new_tokens=max_new_tokens, eos_token_id=stop or None, pad_token_id=pad,
                                top_p=None, top_k=None, temperature=None)
        for r, i in enumerate(rows):
            new = result[r, longest:].cpu()
            ends = [k for k, t in enumerate(new.tolist()) if t in stop]
            new = new[: ends[0] + 1] if ends else new
            out[i] = torch.cat([torch.tensor(prompt_ids[i]), new])
        bar.update(len(rows))
    bar.close()
    return out


def fit_context(prompt_ids: list[list[int]], model: nn.Module, max_new_tokens: int) -> tuple[list[list[int]], int]:
    """Left-truncate prompts so that prompt + generation fits the model's context; returns them and how many."""
    context = int(getattr(text_config(model), "max_position_embeddings", 0) or 0)
    if not context:
        return prompt_ids, 0
    room = context - max_new_tokens
    if room < 8:
        raise LowbitError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in this model's context of "
                          f"{context} tokens; lower it.")
    return [p[-room:] for p in prompt_ids], sum(len(p) > room for p in prompt_ids)


def make_record(model: nn.Module, tokenizer, prompts: list[str], *, source: str, model_name: str,
                max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, top_n: int = DEFAULT_TOP_N,
                progress: bool = True) -> ReferenceRecord:
    """Generate with the reference; the top-N part is filled by `compare` (it runs the reference anyway)."""
    start = time.perf_counter()
    prompt_ids, truncated = fit_context(encode_prompts(tokenizer, prompts), model, max_new_tokens)
    seqs = generate(model, tokenizer, prompt_ids, max_new_tokens, progress=progress)
    meta = {"model": model_name, "model_fingerprint": model_fingerprint(model),
            **record_meta(tokenizer, int(text_config(model).vocab_size), top_n, max_new_tokens, source, len(prompts)),
            "truncated_prompts": truncated, "generation_seconds": round(time.perf_counter() - start, 2)}
    return ReferenceRecord.of_sequences(meta, seqs, [len(p) for p in prompt_ids])


def record_meta(tokenizer, vocab_size: int, top_n: int, max_new_tokens: int, source: str, num_prompts: int) -> dict:
    """What every record of generations says about how it was made (a record's other fields: its model)."""
    from lowbit import __version__

    return {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": vocab_size, "top_n": top_n,
            "max_new_tokens": max_new_tokens, "prompts": source, "num_prompts": num_prompts,
            "lowbit_version": __version__}


def text_record(wins: torch.Tensor, meta: dict) -> ReferenceRecord:
    """A record over fixed text windows [n, seqlen]: every position is prefill (llama.cpp's --kl-divergence)."""
    n, seqlen = wins.shape
    return ReferenceRecord(dict(meta), wins.flatten().int(), torch.arange(n + 1, dtype=torch.long) * seqlen,
                           torch.full((n,), seqlen, dtype=torch.int32))


@dataclass
class Divergence:
    stats: TokenStats
    prompt: np.ndarray  # prompt index of each position
    position: np.ndarray  # position index t within its sequence
    prefill: np.ndarray  # bool: the position predicts a prompt token
    generation_offset: np.ndarray  # t − (prompt_len − 1), for generation positions
    shared: int = 0  # positions t < shared have the same context in every sequence (a common prompt prefix)
    cand_top_ids: np.ndarray | None = None  # [positions, SHOWN_TOP] the candidate's most likely tokens
    cand_top_logprobs: np.ndarray | None = None

    def select(self, mask: np.ndarray) -> Divergence:
        pick = lambda a: None if a is None else a[mask]  # noqa: E731
        return Divergence(self.stats.select(mask), self.prompt[mask], self.position[mask], self.prefill[mask],
                          self.generation_offset[mask], self.shared, pick(self.cand_top_ids),
                          pick(self.cand_top_logprobs))


@dataclass(frozen=True)
class Comparison:
    record: ReferenceRecord  # the record compared against, with the reference's top-N predictions
    divergence: Divergence | None  # None when there was no candidate


def compare(record: ReferenceRecord, candidate: nn.Module | None, reference: nn.Module | None = None,
            batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True) -> Comparison:
    """Teacher-force the candidate (and the reference, when given) on the record's sequences.

    A record without top-N data is completed from the reference's pass: the comparison carries that new record
    (the one given is not changed). Its divergence is None when there is no candidate. The holes of a sparse record
    (a served reference's, lowbit.eval.served_reference: positions it did not return) are left out.
    """
    n_seq = record.num_sequences
    lengths = [int(record.offsets[i + 1] - record.offsets[i]) for i in range(n_seq)]
    pos_off = record.position_offsets()
    fill = record.top_ids is None
    if fill and reference is None:
        raise LowbitError("the reference record holds no predictions and no reference model was given.")
    top_n = record.meta["top_n"]
    if fill:
        total = int(pos_off[-1])
        top_ids, top_logprobs, next_logprob = (torch.zeros(total, top_n, dtype=torch.int32),
                                               torch.zeros(total, top_n), torch.zeros(total))
    else:
        top_ids, top_logprobs, next_logprob = record.top_ids, record.top_logprobs, record.next_logprob
    parts: dict[int, TokenStats] = {}
    cand_top: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    bar = tqdm(total=sum(lengths), desc="teacher forcing", unit="tok", disable=not progress, dynamic_ncols=True,
               unit_scale=True)
    for rows in length_batches(lengths, batch_tokens):
        seqs = [record.sequence(i).long() for i in rows]
        ids, mask = pad_right(seqs)
        ref_lp = logprobs(reference, ids, mask) if reference is not None else None
        cand_lp = logprobs(candidate, ids, mask) if candidate is not None else None
        for r, i in enumerate(rows):
            n = lengths[i] - 1
            sl = slice(int(pos_off[i]), int(pos_off[i]) + n)
            nxt = seqs[r][1:]
            full_ref = ref_lp[r, :n] if ref_lp is not None else None
            if fill:
                vals, top = full_ref.topk(top_n, dim=-1)
                top_ids[sl], top_logprobs[sl] = top.int(), vals
                next_logprob[sl] = full_ref.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
            if cand_lp is not None:
                vals, top = cand_lp[r, :n].topk(SHOWN_TOP, dim=-1)
                cand_top[i] = (top.int(), vals)
                parts[i] = token_stats(top_ids[sl], top_logprobs[sl], next_logprob[sl], cand_lp[r, :n], nxt,
                                       full_ref)
        bar.update(sum(lengths[i] for i in rows))
    bar.close()
    if fill:
        record = record.with_predictions(top_ids, top_logprobs, next_logprob)
    if candidate is None:
        return Comparison(record, None)
    stats = TokenStats.concat([parts[i] for i in range(n_seq)])
    prompt = np.concatenate([np.full(lengths[i] - 1, i) for i in range(n_seq)])
    position = np.concatenate([np.arange(lengths[i] - 1) for i in range(n_seq)])
    plen = record.prompt_lens.numpy()[prompt]
    prefill = position < plen - 1
    d = Divergence(stats, prompt, position, prefill, position - (plen - 1), common_prefix(record),
                   torch.cat([cand_top[i][0] for i in range(n_seq)]).numpy(),
                   torch.cat([cand_top[i][1] for i in range(n_seq)]).numpy())
    held = reference_returned(record)
    return Comparison(record, d if held.all() else d.select(held))


def reference_returned(record: ReferenceRecord) -> np.ndarray:
    """Per position, whether the record holds the reference's prediction there: everywhere but a sparse record's
    holes (id −1 in the first column)."""
    return (record.top_ids[:, 0] >= 0).numpy()


def compare_answers(record: ReferenceRecord, answers: list) -> tuple[Divergence, dict]:
    """`compare` for a served candidate: its sparse answers (lowbit.eval.echo.Answer, one per sequence of the record)
    against the record's top-N (lowbit.eval.stats.sparse_token_stats). Positions the server did not return, and
    those where none of the reference's top-N ids came back (no KL can be formed there), are left out of the
    statistics and counted in the returned dict, with the mean size of the top-N ∩ returned ids; so are the holes of
    a sparse record (a served reference's). Where the server's most likely token is a text no one id has ('' for a
    control token, lowbit.eval.token_text), it is rejected unless the reference's top-1 reads as that text."""
    if record.top_ids is None:
        raise LowbitError("the reference record holds no predictions; give --reference MODEL to complete it.")
    pos_off = record.position_offsets()
    held = reference_returned(record)
    parts, prompt, position, top_ids, top_lps = [], [], [], [], []
    counts = {"positions": int(pos_off[-1]), "positions_not_returned": 0, "positions_not_in_reference":
              int((~held).sum()), "positions_no_overlap": 0, "positions_argmax_by_text": 0}
    overlap, dropped = [], 0
    for i, a in enumerate(answers):
        sl = slice(int(pos_off[i]), int(pos_off[i + 1]))
        returned = a.returned & held[sl]
        keep = torch.from_numpy(returned)
        ref_ids = record.top_ids[sl][keep]
        stats = sparse_token_stats(ref_ids, record.top_logprobs[sl][keep], record.next_logprob[sl][keep],
                                   torch.from_numpy(a.ids[returned]), torch.from_numpy(a.logprobs[returned]),
                                   torch.from_numpy(a.next_logprob[returned]))
        at = np.nonzero(returned)[0]  # the position of each row
        hidden = a.hidden_logprob[at] > a.logprobs[at].max(-1)
        for r in np.nonzero(hidden)[0]:  # the server's most likely token reads as a text no one id has
            stats.rejected[r] = float(int(ref_ids[r, 0]) not in a.hidden_ids[at[r]])
        counts["positions_argmax_by_text"] += int(hidden.sum())
        ok = np.isfinite(stats.kl)
        counts["positions_not_returned"] += int((~a.returned).sum())
        counts["positions_no_overlap"] += int((~ok).sum())
        ref = ref_ids.numpy()
        found = ((ref[:, :, None] == a.ids[at][:, None, :]).any(-1) & (ref >= 0)).sum(-1)
        overlap.append(found[ok])
        dropped += a.keys_left_out
        parts.append(stats.select(ok))
        prompt.append(np.full(int(ok.sum()), i))
        position.append(at[ok])
        top_ids.append(a.ids[at[ok], :SHOWN_TOP])
        top_lps.append(a.logprobs[at[ok], :SHOWN_TOP])
    prompt_of, pos = np.concatenate(prompt), np.concatenate(position)
    plen = record.prompt_lens.numpy()[prompt_of]
    width = max(x.shape[1] for x in top_ids)
    pad = lambda xs, v: np.concatenate([np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=v)  # noqa: E731
                                        for x in xs])
    d = Divergence(TokenStats.concat(parts), prompt_of, pos, pos < plen - 1, pos - (plen - 1), common_prefix(record),
                   pad(top_ids, -1), pad(top_lps, -np.inf))
    counts["positions_compared"] = len(pos)
    counts["mean_overlap"] = float(np.concatenate(overlap).mean()) if len(pos) else None
    counts["keys_left_out"] = dropped
    return d, counts


def common_prefix(record: ReferenceRecord) -> int:
    """Length of the token prefix that every sequence starts with (a chat template's system prompt, say); 0 for a
    single sequence. The predictions at positions t < this length are the same in every sequence."""
    if record.num_sequences < 2:
        return 0
    seqs = [record.sequence(i) for i in range(record.num_sequences)]
    n = min(int(record.prompt_lens.min()), *(len(q) for q in seqs))
    first = seqs[0][:n]
    same = torch.stack([q[:n] == first for q in seqs]).all(0)
    return int(n if bool(same.all()) else same.int().argmin())


def summarize_divergence(d: Divergence, top_n: int, seed: int = 0) -> dict:
    gen = ~d.prefill
    per_prompt = [float(d.stats.kl[d.prompt == i].mean()) if (d.prompt == i).any() else None
                  for i in range(int(d.prompt.max()) + 1)]
    return {
        "top_n": top_n,
        "prompts": int(d.prompt.max()) + 1,
        "all": summarize(d.stats, d.prompt, seed),
        "prefill": summarize(d.stats.select(d.prefill), d.prompt[d.prefill], seed),
        "generation": summarize(d.stats.select(gen), d.prompt[gen], seed),
        "by_position": by_position(d.stats.kl[gen], d.generation_offset[gen], POSITION_BUCKET),
        "by_position_prefill": by_position(d.stats.kl[d.prefill], d.position[d.prefill], POSITION_BUCKET),
        **shared_prefix_summary(d, seed),
        "per_prompt": per_prompt,
        "histogram": histogram(d.stats.kl),
    }


def shared_prefix_summary(d: Divergence, seed: int = 0) -> dict:
    """The common prompt prefix counted once: its mean KL, and prefill statistics without it. Every prompt repeats
    the same predictions there, so the prefill mean weighs one text by the number of prompts, and a CI that
    resamples prompts cannot see that it is a single sample."""
    if not d.shared or not (d.position < d.shared).any():  # (a served candidate may not return those positions)
        return {}
    once = (d.prompt == 0) & (d.position < d.shared)
    rest = d.prefill & (d.position >= d.shared)
    out = {"shared_prefix": {"tokens": d.shared, "positions": int((d.position < d.shared).sum()),
                             "mean": float(d.stats.kl[once].mean()) if once.any() else None}}
    if rest.any():
        out["prefill_unshared"] = summarize(d.stats.select(rest), d.prompt[rest], seed)
    return out


def histogram(kl: np.ndarray, lo: float = -8.0, hi: float = 2.0, step: float = 0.25) -> dict:
    """Counts of per-token KL in log10 bins (values under 10^lo fall in the first bin)."""
    edges = np.arange(lo, hi + step / 2, step)
    counts, _ = np.histogram(np.clip(np.log10(np.maximum(kl, 1e-30)), lo, hi - 1e-9), bins=edges)
    return {"log10_edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()}


def worst_prompts(d: Divergence, record: ReferenceRecord, tokenizer, k: int = WORST_PROMPTS,
                  max_tokens: int = WORST_TOKENS) -> list[dict]:
    """The k prompts with the highest mean KL, token by token: each token's text, the KL of its prediction, and
    both models' most likely tokens there (for the report's shading and hover). Up to `max_tokens` per prompt."""
    if d.cand_top_ids is None:
        return []
    means = {i: float(d.stats.kl[d.prompt == i].mean()) for i in np.unique(d.prompt)}
    pos_off = record.position_offsets()
    text = lambda ids: [tokenizer.decode([int(t)]) for t in ids]  # noqa: E731  (a top token on its own)
    out = []
    for i in sorted(means, key=means.get, reverse=True)[:k]:
        seq = record.sequence(int(i)).tolist()[: max_tokens + 1]
        n = len(seq) - 1
        sl = slice(int(pos_off[i]), int(pos_off[i]) + n)
        ref_ids, ref_lp = record.top_ids[sl, :SHOWN_TOP], record.top_logprobs[sl, :SHOWN_TOP].float()
        ref_lp, ref_ids = ref_lp.numpy(), ref_ids.numpy()
        rows = np.nonzero(d.prompt == i)[0]
        rows = rows[d.position[rows] < n]  # a served candidate may leave positions out: those read None, []
        kl: list = [None] * n
        cand: list = [[] for _ in range(n)]
        for t, value, ids, lps in zip(d.position[rows].tolist(), d.stats.kl[rows].round(6).tolist(),
                                      d.cand_top_ids[rows], d.cand_top_logprobs[rows], strict=True):
            kl[t] = value
            cand[t] = list(zip(text(ids[ids >= 0]), np.exp(lps[ids >= 0]).round(4).tolist(), strict=True))
        out.append({
            "prompt": int(i), "mean": means[i], "prompt_tokens": int(record.prompt_lens[i]),
            "tokens": token_texts(tokenizer, seq), "kl": kl,
            "reference_top": [list(zip(text(ids[ids >= 0]), np.exp(lp[ids >= 0]).round(4).tolist(), strict=True))
                              for ids, lp in zip(ref_ids, ref_lp, strict=True)],  # (a sparse record pads with −1)
            "candidate_top": cand,
        })
    return out


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text as it reads in the decoded sequence (with the spaces a tokenizer only shows in context):
    the growth of the decoded prefix at each token."""
    out, prev = [], ""
    for k in range(1, len(ids) + 1):
        cur = tokenizer.decode(ids[:k])
        out.append(cur[len(prev):] if cur.startswith(prev) else tokenizer.decode(ids[k - 1:k]))
        prev = cur
    return out
