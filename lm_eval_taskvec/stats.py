"""Paired tests over the same documents: is one way of running the model better than another?"""

from __future__ import annotations

from math import comb


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: ``b`` documents right only in the first
    run, ``c`` right only in the second (a binomial test of b against Binomial(b + c, 1/2))."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)
