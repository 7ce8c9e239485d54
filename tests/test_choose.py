"""Choosing: the budget allocator and the Pareto frontier against brute force."""

from __future__ import annotations

import itertools
import random

import pytest

from lowbit.choose.allocate import Choice, allocate, smallest_bits
from lowbit.choose.pareto import dominates, frontier
from lowbit.errors import LowbitError


def _instance(rng: random.Random, n_layers: int, n_choices: int) -> dict[str, list[Choice]]:
    layers = {}
    for i in range(n_layers):
        size = rng.choice([64, 96, 128])
        opts = []
        for b in rng.sample([2, 3, 4, 5, 6, 8, 16], n_choices):
            bits = size * b + rng.choice([0, 16, 32])  # statistics
            opts.append(Choice(f"{b}-bit", bits, 0.0 if b == 16 else rng.random() / b))
        layers[f"layer{i}"] = opts
    return layers


def _brute(layers: dict[str, list[Choice]], budget: int) -> float:
    best = float("inf")
    for combo in itertools.product(*layers.values()):
        if sum(c.bits for c in combo) <= budget:
            best = min(best, sum(c.cost for c in combo))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_allocation_is_optimal_and_within_budget(seed):
    rng = random.Random(seed)
    layers = _instance(rng, rng.randint(1, 5), rng.randint(1, 4))
    lo, hi = smallest_bits(layers), sum(max(c.bits for c in o) for o in layers.values())
    for budget in sorted({lo, hi, rng.randint(lo, hi), rng.randint(lo, hi)}):
        a = allocate(layers, budget)
        assert a.exact and a.bits <= budget
        assert a.bits == sum(c.bits for c in a.choices.values()) and list(a.choices) == list(layers)
        assert a.cost == pytest.approx(_brute(layers, budget), abs=1e-12)


def test_coarse_resolution_never_exceeds_the_budget():
    rng = random.Random(7)
    layers = _instance(rng, 6, 4)
    lo, hi = smallest_bits(layers), sum(max(c.bits for c in o) for o in layers.values())
    for budget in range(lo + 50, hi, 97):
        a = allocate(layers, budget, max_states=40)
        assert a.bits <= budget
        assert a.cost >= _brute(layers, budget) - 1e-12


def test_impossible_budget_is_explained():
    layers = {"a": [Choice("4-bit", 400, 0.1), Choice("16-bit", 1600, 0.0)]}
    with pytest.raises(LowbitError, match="below the smallest allocation, 400 bits"):
        allocate(layers, 399)
    with pytest.raises(LowbitError, match="at least one choice"):
        allocate({"a": []}, 1000)


@pytest.mark.parametrize("seed", range(20))
def test_frontier_equals_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(0, 30)
    dims = 2 if seed % 3 else 3
    pts = [tuple(float(rng.randint(0, 6)) for _ in range(dims)) for _ in range(n)]
    brute = [i for i, p in enumerate(pts) if not any(dominates(q, p) for q in pts)]
    assert sorted(frontier(pts)) == brute
    got = frontier(pts)
    assert [pts[i][0] for i in got] == sorted(pts[i][0] for i in got)
