"""Mixed precision under a size budget: one format per layer, least predicted damage, every stored bit counted.

It is the multiple-choice knapsack: layer i takes exactly one choice j, which stores b_ij bits and costs d_ij
(the KL it is predicted to add, costs summed over layers):

    minimize Σ_i d_i,j(i)   subject to   Σ_i b_i,j(i) ≤ B.

Each layer's smallest choice is paid first; what is left, B − Σ_i min_j b_ij, is shared out by dynamic programming
over the extra bits e_ij = b_ij − min_j b_ij in units of u bits: best_i(s) = min_j best_(i−1)(s − ⌈e_ij/u⌉) + d_ij.
u is the greatest common divisor of the extras when that leaves few enough states; otherwise the extras are
rounded *up* to a coarser u, so the answer never exceeds B (and may leave up to one unit per layer unused;
`exact` says which). The Lagrangian relaxation (each layer minimizing d_ij + λ b_ij) only reaches allocations on
the lower convex hull; the program reaches every one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lowbit.errors import LowbitError

MAX_STATES = 200_000


@dataclass(frozen=True)
class Choice:
    """One way to store a layer: a label (a scheme, or "16-bit"), its stored bits and its predicted cost."""

    label: str
    bits: int
    cost: float


@dataclass(frozen=True)
class Allocation:
    choices: dict[str, Choice]
    bits: int
    cost: float
    exact: bool  # solved in units of the sizes' common divisor (else sizes were rounded up to fit MAX_STATES)


def smallest_bits(layers: dict[str, list[Choice]]) -> int:
    return sum(min(c.bits for c in options) for options in layers.values())


def allocate(layers: dict[str, list[Choice]], budget_bits: int, max_states: int = MAX_STATES) -> Allocation:
    """The choice per layer with the least total cost whose total bits stay within `budget_bits`."""
    if not layers or any(not options for options in layers.values()):
        raise LowbitError("nothing to allocate: every layer needs at least one choice.")
    floor = smallest_bits(layers)
    if budget_bits < floor:
        raise LowbitError(f"a budget of {budget_bits} bits is below the smallest allocation, {floor} bits (every "
                          f"layer at its smallest choice): raise the budget or offer smaller formats.")
    lowest = {name: min(c.bits for c in options) for name, options in layers.items()}
    extras = [c.bits - lowest[name] for name, options in layers.items() for c in options]
    room = budget_bits - floor
    unit = math.gcd(*extras) or 1
    exact = room // unit <= max_states
    if not exact:
        unit = math.ceil(room / max_states)
    states = room // unit

    def units(name: str, c: Choice) -> int:
        return math.ceil((c.bits - lowest[name]) / unit)

    best = np.zeros(states + 1)  # best[s]: least cost of the layers so far within s units of extra bits
    picks = []
    for name, options in layers.items():
        new = np.full(states + 1, np.inf)
        pick = np.zeros(states + 1, dtype=np.int16)
        for j, c in enumerate(options):
            u = units(name, c)
            if u > states:
                continue
            cand = np.full(states + 1, np.inf)
            cand[u:] = best[:states + 1 - u] + c.cost
            better = cand < new
            new[better], pick[better] = cand[better], j
        best = new
        picks.append(pick)
    chosen, s = {}, states
    for (name, options), pick in zip(reversed(list(layers.items())), reversed(picks), strict=True):
        c = options[int(pick[s])]
        chosen[name] = c
        s -= units(name, c)
    chosen = {name: chosen[name] for name in layers}
    return Allocation(chosen, sum(c.bits for c in chosen.values()), sum(c.cost for c in chosen.values()), exact)
