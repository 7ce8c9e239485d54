"""The Pareto frontier of configurations: the points no other point beats on every axis at once."""

from __future__ import annotations

from collections.abc import Sequence


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a is at least as good as b on every axis (all minimized) and better on one."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def frontier(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points, every axis minimized (negate an axis to maximize it), in order of the
    first axis. Equal points are all kept. Two axes: one sort and a sweep; more: pairwise."""
    if not points:
        return []
    if len(points[0]) != 2:
        return sorted((i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)),
                      key=lambda i: tuple(points[i]))
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    kept: list[int] = []
    best_y = float("inf")
    for i in order:
        x, y = points[i]
        if y < best_y or (kept and points[kept[-1]][0] == x and points[kept[-1]][1] == y):
            kept.append(i)
            best_y = min(best_y, y)
    return kept
