"""Divergence statistics against direct, independent computations on small random distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.eval.stats import TokenStats, bootstrap_ci, by_position, summarize, token_stats


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _case(seed: int, T: int = 30, V: int = 40, N: int = 8, scale: float = 0.7):
    rng = np.random.default_rng(seed)
    ref_logits = rng.normal(size=(T, V)) * 3
    cand_logits = ref_logits + rng.normal(size=(T, V)) * scale
    nxt = rng.integers(0, V, size=T)
    ref_lp = torch.log_softmax(torch.tensor(ref_logits, dtype=torch.float32), -1)
    cand_lp = torch.log_softmax(torch.tensor(cand_logits, dtype=torch.float32), -1)
    top_vals, top_ids = ref_lp.topk(N, -1)
    next_lp = ref_lp.gather(-1, torch.tensor(nxt).unsqueeze(-1)).squeeze(-1)
    return ref_logits, cand_logits, nxt, ref_lp, cand_lp, top_vals, top_ids, next_lp


@pytest.mark.parametrize("seed", range(5))
def test_token_stats_match_direct_computation(seed):
    ref_logits, cand_logits, nxt, ref_lp, cand_lp, top_vals, top_ids, next_lp = _case(seed)
    got = token_stats(top_ids, top_vals, next_lp, cand_lp, torch.tensor(nxt), ref_lp)
    for t in range(len(nxt)):
        p, q = _softmax(ref_logits[t]), _softmax(cand_logits[t])
        top = np.argsort(-p)[:8]
        P, Q = p[top] / p[top].sum(), q[top] / q[top].sum()
        assert got.kl[t] == pytest.approx(np.sum(P * np.log(P / Q)), abs=1e-5)
        assert got.kl_full[t] == pytest.approx(np.sum(p * np.log(p / q)), abs=1e-5)
        assert got.rejected[t] == float(np.argmax(q) != np.argmax(p))
        assert got.spec_rejection[t] == pytest.approx(1 - np.minimum(p[top], q[top]).sum(), abs=1e-5)
        assert got.spec_rejection_full[t] == pytest.approx(1 - np.minimum(p, q).sum(), abs=1e-5)
        assert got.dp[t] == pytest.approx(q[nxt[t]] - p[nxt[t]], abs=1e-6)


def test_top_n_over_whole_vocabulary_is_the_full_kl():
    _, _, nxt, ref_lp, cand_lp, _, _, next_lp = _case(7, V=12, N=12)
    vals, ids = ref_lp.topk(12, -1)
    got = token_stats(ids, vals, next_lp, cand_lp, torch.tensor(nxt), ref_lp)
    np.testing.assert_allclose(got.kl, got.kl_full, atol=1e-5)


def test_renormalization_ignores_mass_outside_top_n():
    """Scaling the candidate's mass outside the top-N does not change the top-N KL, but changes the full KL."""
    _, _, nxt, ref_lp, cand_lp, vals, ids, next_lp = _case(3)
    moved = cand_lp.clone()
    outside = torch.ones_like(moved, dtype=torch.bool).scatter_(-1, ids, False)
    moved[outside] += 1.5
    moved = torch.log_softmax(moved, -1)
    a = token_stats(ids, vals, next_lp, cand_lp, torch.tensor(nxt), ref_lp)
    b = token_stats(ids, vals, next_lp, moved, torch.tensor(nxt), ref_lp)
    np.testing.assert_allclose(a.kl, b.kl, atol=1e-5)
    assert (np.abs(b.kl_full - a.kl_full) > 1e-3).mean() > 0.9


def test_identical_distributions_give_zero():
    _, _, nxt, ref_lp, _, vals, ids, next_lp = _case(1)
    s = token_stats(ids, vals, next_lp, ref_lp, torch.tensor(nxt), ref_lp)
    assert np.all(s.kl == 0) and np.all(s.kl_full == 0) and np.all(s.rejected == 0) and np.all(s.dp == 0)
    assert np.abs(s.spec_rejection_full).max() < 1e-6


def test_bootstrap_interval_covers_the_true_mean():
    """Prompt-level resampling: about 95% of intervals contain the population mean on clustered synthetic data."""
    rng = np.random.default_rng(0)
    trials, covered = 300, 0
    for _ in range(trials):
        counts = rng.integers(5, 60, size=40)
        prompt_means = rng.normal(1.0, 0.5, size=40)
        values = np.concatenate([m + rng.normal(0, 0.3, size=c) for m, c in zip(prompt_means, counts, strict=True)])
        groups = np.repeat(np.arange(40), counts)
        lo, hi = bootstrap_ci(values, groups, n_resamples=400, seed=int(rng.integers(1 << 30)))
        covered += lo <= 1.0 <= hi
    assert 0.88 <= covered / trials <= 0.99


def test_bootstrap_resamples_prompts_not_tokens():
    """Tokens of one prompt move together: a token-level bootstrap would be far too narrow here."""
    groups = np.repeat(np.arange(10), 100)
    values = np.repeat(np.arange(10, dtype=float), 100)
    lo, hi = bootstrap_ci(values, groups, n_resamples=500)
    assert hi - lo > 2.0


def test_summary_fields():
    _, _, nxt, ref_lp, cand_lp, vals, ids, next_lp = _case(4)
    s = token_stats(ids, vals, next_lp, cand_lp, torch.tensor(nxt), ref_lp)
    groups = np.repeat(np.arange(6), 5)
    out = summarize(s, groups)
    assert out["tokens"] == 30
    assert out["mean"] == pytest.approx(s.kl.mean())
    assert out["median"] == pytest.approx(np.median(s.kl)) and out["max"] == pytest.approx(s.kl.max())
    assert out["p99"] == pytest.approx(np.quantile(s.kl, 0.99))
    assert out["same_top"] == pytest.approx(1 - out["token_rejection_rate"])
    assert out["rms_dp"] == pytest.approx(np.sqrt(np.mean(s.dp**2)))
    assert out["ci95"][0] <= out["mean"] <= out["ci95"][1]
    assert summarize(TokenStats.concat([s.select(np.zeros(30, bool))]), np.zeros(0))["mean"] is None


def test_by_position_buckets():
    values = np.arange(10, dtype=float)
    b = by_position(values, np.arange(10), 4)
    assert [(x["start"], x["tokens"], x["mean"]) for x in b] == [(0, 4, 1.5), (4, 4, 5.5), (8, 2, 8.5)]
