"""The paper's greedy ternary search for multistep sampling's time points (Sec. 6, App. C).

Algorithm 1's intermediate taus are chosen one at a time: with the earlier ones fixed, the next
index on the N-point Karras grid is found by a ternary search on the sample-quality metric,
which is treated as unimodal in the index. Pure Python: the caller supplies the metric.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Score = Callable[[tuple[int, ...]], float]


@dataclass
class SearchResult:
    """The chosen indices (0, ..., N - 1) and every candidate scored on the way."""

    indices: tuple[int, ...]
    score: float
    evaluated: dict[tuple[int, ...], float] = field(default_factory=dict)


def ternary_search(f: Callable[[int], float], lo: int, hi: int) -> int:
    """argmin of a unimodal ``f`` over the integers lo..hi, in O(log(hi - lo)) evaluations.

    Ties keep both thirds' inner points in range, so a plateau never discards the minimum.
    """
    if lo > hi:
        raise ValueError(f"empty search range {lo}..{hi}")
    while hi - lo > 2:
        m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
        f1, f2 = f(m1), f(m2)
        if f1 < f2:
            hi = m2 - 1
        elif f1 > f2:
            lo = m1 + 1
        else:
            lo, hi = m1, m2
    return min(range(lo, hi + 1), key=f)


def greedy_indices(score: Score, N: int, steps: int) -> SearchResult:
    """Algorithm 1's time points by greedy ternary search on FID, as Song et al. 2023 pick them.

    Indices 0 = i_0 < i_1 < ... < i_{steps-1} < N - 1 for ``steps``-step sampling, each new
    i_k by ternary search in (i_{k-1}, N - 1) with i_1..i_{k-1} fixed (the paper's greedy
    scheme). ``score`` gets a full index tuple ending at N - 1 and is called once per tuple."""
    if steps < 2 or steps + 1 > N:
        raise ValueError(f"{steps}-step sampling needs steps >= 2 and N >= {steps + 1}; N = {N}")
    evaluated: dict[tuple[int, ...], float] = {}

    def cached(indices: Sequence[int]) -> float:
        key = tuple(indices)
        if key not in evaluated:
            evaluated[key] = score(key)
        return evaluated[key]

    chosen: list[int] = [0]
    for k in range(1, steps):
        # Leave room for the steps still to place after this one.
        last = N - 1 - (steps - k)
        best = ternary_search(lambda i: cached([*chosen, i, N - 1]), chosen[-1] + 1, last)
        chosen.append(best)
    final = (*chosen, N - 1)
    return SearchResult(final, cached(final), evaluated)
