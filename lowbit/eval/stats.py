"""Per-token divergence statistics and their summaries (Fireworks' method, with llama.cpp's extras).

For a position t, the reference records its top-N token ids I and log-probabilities; the candidate's
log-probabilities are read at the same ids. Both are renormalized over I (Fireworks):

    P_i = p_i / Σ_{j∈I} p_j,   Q_i = q_i / Σ_{j∈I} q_j,   KL_topN = Σ_{i∈I} P_i (log P_i − log Q_i)

With both models' full distributions, KL_full = Σ_v p_v (log p_v − log q_v). A token is *rejected* when the
candidate's most likely token differs from the reference's (same_top = 1 − rejection). spec_rejection =
1 − Σ_v min(p_v, q_v) is the chance that a speculative-decoding step, with the candidate as draft and the
reference as target, rejects (Leviathan et al. 2023). Over the top-N alone it is an upper bound. Δp = q(x) − p(x)
for the token x that actually comes next.

A served candidate (lowbit.eval.served) gives, per position, only the ids K its API returned — its top-k and the
log-prob of the next token x — not a full distribution (`sparse_token_stats`). Then the sums run over I ∩ K, both
distributions renormalized there:

    P_i = p_i / Σ_{j∈I∩K} p_j,   Q_i = q_i / Σ_{j∈I∩K} q_j,   KL = Σ_{i∈I∩K} P_i (log P_i − log Q_i)

(NaN where I ∩ K is empty), rejection compares the candidate's most likely id among K with the reference's top-1,
spec_rejection = 1 − Σ_{i∈I∩K} min(p_i, q_i) (an upper bound, like the top-N one), and Δp = q(x) − p(x) as before.
When K covers the vocabulary these are exactly `token_stats`'s. A served reference's record is sparse too
(lowbit.eval.served_reference): its rows are padded with id −1, and I is then the ids it holds, in either function.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TokenStats:
    """Per-position statistics (1-D float arrays of one length)."""

    kl: np.ndarray
    rejected: np.ndarray
    spec_rejection: np.ndarray
    dp: np.ndarray
    kl_full: np.ndarray | None = None
    spec_rejection_full: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.kl)

    def select(self, mask: np.ndarray) -> TokenStats:
        pick = lambda a: None if a is None else a[mask]  # noqa: E731
        return TokenStats(self.kl[mask], self.rejected[mask], self.spec_rejection[mask], self.dp[mask],
                          pick(self.kl_full), pick(self.spec_rejection_full))

    @staticmethod
    def concat(parts: list[TokenStats]) -> TokenStats:
        cat = lambda name: (None if getattr(parts[0], name) is None  # noqa: E731
                            else np.concatenate([getattr(p, name) for p in parts]))
        return TokenStats(*(cat(n) for n in ("kl", "rejected", "spec_rejection", "dp", "kl_full",
                                              "spec_rejection_full")))


def renormalized(logprobs: torch.Tensor) -> torch.Tensor:
    """log of the distribution renormalized over the given entries (last dimension)."""
    return logprobs - torch.logsumexp(logprobs, dim=-1, keepdim=True)


def token_stats(ref_top_ids: torch.Tensor, ref_top_logprobs: torch.Tensor, ref_next_logprob: torch.Tensor,
                cand_logprobs: torch.Tensor, next_ids: torch.Tensor,
                ref_logprobs: torch.Tensor | None = None) -> TokenStats:
    """Statistics at T positions.

    ref_top_ids, ref_top_logprobs: [T, N], the reference's top-N (log-probs over the full vocabulary, descending);
    ref_next_logprob: [T], the reference's log-prob of the token that comes next; cand_logprobs: [T, V] full
    log-softmax of the candidate; next_ids: [T]; ref_logprobs: [T, V] full reference log-probs, when available.
    A sparse record (a served reference) pads its rows with id −1: the sums run over the ids it has (NaN KL where
    it has none).
    """
    known = ref_top_ids >= 0
    lp = torch.where(known, ref_top_logprobs.float(), -torch.inf)
    lq = torch.where(known, cand_logprobs.float().gather(-1, ref_top_ids.long().clamp(min=0)), -torch.inf)
    log_p, log_q = renormalized(lp), renormalized(lq)
    terms = torch.where(known, log_p.exp() * (log_p - log_q), 0.0)
    kl = terms.sum(-1).clamp(min=0).masked_fill(~known.any(-1), torch.nan)
    rejected = cand_logprobs.argmax(-1) != ref_top_ids[:, 0]
    spec = 1 - torch.minimum(lp.exp(), lq.exp()).sum(-1)
    q_next = cand_logprobs.float().gather(-1, next_ids.long().unsqueeze(-1)).squeeze(-1)
    dp = q_next.exp() - ref_next_logprob.float().exp()
    out = TokenStats(kl.numpy(), rejected.float().numpy(), spec.clamp(0, 1).numpy(), dp.numpy())
    if ref_logprobs is not None:
        p = ref_logprobs.float()
        q = cand_logprobs.float()
        out.kl_full = (p.exp() * (p - q)).sum(-1).clamp(min=0).numpy()
        out.spec_rejection_full = (1 - torch.minimum(p.exp(), q.exp()).sum(-1)).clamp(0, 1).numpy()
    return out


def sparse_token_stats(ref_top_ids: torch.Tensor, ref_top_logprobs: torch.Tensor, ref_next_logprob: torch.Tensor,
                       cand_ids: torch.Tensor, cand_logprobs: torch.Tensor,
                       cand_next_logprob: torch.Tensor) -> TokenStats:
    """Statistics at T positions from the candidate's sparse answer (the module's docstring says how).

    ref_*: as in `token_stats`; cand_ids, cand_logprobs: [T, K] the ids the candidate returned and their log-probs
    over its full vocabulary, padded with id −1 (any log-prob); cand_next_logprob: [T], its log-prob of the next token.
    """
    ref_ids = ref_top_ids.long()
    ids = cand_ids.long()
    lq_all = torch.where(ids >= 0, cand_logprobs.float(), torch.tensor(-torch.inf))
    match = (ref_ids.unsqueeze(-1) == ids.unsqueeze(-2)) & (ids >= 0).unsqueeze(-2)  # [T, N, K]
    found = match.any(-1)
    lq = torch.where(match, lq_all.unsqueeze(-2), torch.tensor(-torch.inf)).amax(-1)
    lp = torch.where(found, ref_top_logprobs.float(), torch.tensor(-torch.inf))
    log_p, log_q = renormalized(lp), renormalized(lq)
    terms = torch.where(found, log_p.exp() * (log_p - log_q), torch.zeros(()))
    empty = ~found.any(-1)
    kl = terms.sum(-1).clamp(min=0).masked_fill(empty, torch.nan)
    top = ids.gather(-1, lq_all.argmax(-1, keepdim=True)).squeeze(-1)
    rejected = top != ref_ids[:, 0]
    overlap = torch.where(found, torch.minimum(lp.exp(), lq.exp()), torch.zeros(())).sum(-1)
    dp = cand_next_logprob.float().exp() - ref_next_logprob.float().exp()
    return TokenStats(kl.numpy(), rejected.float().numpy(), (1 - overlap).clamp(0, 1).numpy(), dp.numpy())


def bootstrap_ci(values: np.ndarray, groups: np.ndarray, n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """CI of the token-weighted mean, resampling whole groups (prompts) with replacement.

    Tokens of one prompt are not independent, so prompts are the unit that is resampled.
    """
    ids, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=len(ids))
    counts = np.bincount(inverse, minlength=len(ids)).astype(float)
    if len(ids) < 2:
        m = float(sums.sum() / max(counts.sum(), 1))
        return (m, m)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(ids), size=(n_resamples, len(ids)))
    means = sums[pick].sum(1) / np.maximum(counts[pick].sum(1), 1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return (float(lo), float(hi))


def summarize(stats: TokenStats, prompt_of_token: np.ndarray, seed: int = 0) -> dict:
    """The DESIGN.md summary of one split (all, prefill or generation)."""
    n = len(stats)
    if n == 0:
        return {"tokens": 0, "mean": None, "ci95": None, "mean_full": None, "median": None, "p90": None,
                "p99": None, "max": None, "token_rejection_rate": None, "spec_rejection": None, "same_top": None,
                "mean_dp": None, "rms_dp": None}
    kl = stats.kl
    rejection = float(stats.rejected.mean())
    return {
        "tokens": int(n),
        "mean": float(kl.mean()),
        "ci95": list(bootstrap_ci(kl, prompt_of_token, seed=seed)),
        "mean_full": None if stats.kl_full is None else float(stats.kl_full.mean()),
        "mean_full_ci95": None if stats.kl_full is None else list(bootstrap_ci(stats.kl_full, prompt_of_token,
                                                                               seed=seed)),
        "median": float(np.median(kl)),
        "p90": float(np.quantile(kl, 0.90)),
        "p99": float(np.quantile(kl, 0.99)),
        "max": float(kl.max()),
        "token_rejection_rate": rejection,
        "token_rejection_ci95": list(bootstrap_ci(stats.rejected, prompt_of_token, seed=seed)),
        "spec_rejection": float(stats.spec_rejection.mean()) if stats.spec_rejection_full is None
        else float(stats.spec_rejection_full.mean()),
        "spec_rejection_top_n": float(stats.spec_rejection.mean()),
        "same_top": 1 - rejection,
        "mean_dp": float(stats.dp.mean()),
        "rms_dp": float(np.sqrt(np.mean(stats.dp**2))),
    }


def by_position(values: np.ndarray, positions: np.ndarray, width: int) -> list[dict]:
    """Mean of values in position buckets [start, start + width)."""
    if len(values) == 0:
        return []
    out = []
    for start in range(0, int(positions.max()) + 1, width):
        mask = (positions >= start) & (positions < start + width)
        if mask.any():
            out.append({"start": start, "end": start + width, "mean": float(values[mask].mean()),
                        "tokens": int(mask.sum())})
    return out
