"""Paired significance tests between two runs over the same documents (lm-eval has none built in)."""

from __future__ import annotations

from numbers import Real

import numpy as np

ALPHA = 0.05
BOOTSTRAP_CHUNK = 1000  # resamples per step: bounds memory at chunk × documents


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant documents (a right and b wrong, and the reverse):
    under the null each discordant document favours either run with probability 1/2."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    term = tail = 1  # C(n, 0); then C(n, k) from C(n, k - 1), exactly, in integers
    for k in range(1, min(a_only, b_only) + 1):
        term = term * (n - k + 1) // k
        tail += term
    return min(1.0, 2 * tail / 2**n)


def fewest_for_significance(alpha: float = ALPHA) -> int:
    """The fewest paired documents with which the exact McNemar test can reach p < ``alpha`` (all discordant,
    all one way): with fewer, no difference is ever significant."""
    n = 1
    while mcnemar_exact(n, 0) >= alpha:
        n += 1
    return n


def paired_bootstrap(a, b, iters: int = 10_000, seed: int = 1234) -> float:
    """Two-sided p-value for mean(a - b) = 0 by the paired bootstrap: documents are resampled with
    replacement and the resampled mean differences, shifted to the null, are compared with the observed one."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    observed = d.mean()
    rng = np.random.default_rng(seed)
    extreme = 0
    for start in range(0, iters, BOOTSTRAP_CHUNK):
        size = min(BOOTSTRAP_CHUNK, iters - start)
        means = d[rng.integers(0, len(d), size=(size, len(d)))].mean(axis=1)
        extreme += int(np.count_nonzero(np.abs(means - observed) >= abs(observed) - 1e-12))
    return (1 + extreme) / (1 + iters)


def paired_scores(a_samples: list[dict], b_samples: list[dict], metric: str, filter_name: str):
    """Per-document scores of ``metric`` that both runs logged for the same documents.

    Documents match by ``doc_id`` and ``doc_hash``: a doc_id whose content differs between the runs (other
    data, other order) is not paired and is counted in ``unmatched``. Returns (a, b, unmatched), or None
    when a score is not a number (corpus-level metrics such as BLEU log per-document tuples).
    """

    def index(samples):
        return {
            (s.get("doc_id"), s.get("doc_hash")): s[metric]
            for s in samples
            if s.get("filter", "none") == filter_name and metric in s
        }

    a_scores, b_scores = index(a_samples), index(b_samples)
    shared = sorted(a_scores.keys() & b_scores.keys(), key=lambda key: (str(type(key[0])), key[0], str(key[1])))
    values = [(a_scores[k], b_scores[k]) for k in shared]
    if any(not isinstance(v, Real) for pair in values for v in pair):
        return None
    unmatched = len({k[0] for k in a_scores} & {k[0] for k in b_scores}) - len({k[0] for k in shared})
    return [float(x) for x, _ in values], [float(y) for _, y in values], unmatched


def paired_test(a: list[float], b: list[float], iters: int = 10_000, seed: int = 1234) -> dict:
    """Exact McNemar when every score is 0 or 1, else the seeded paired bootstrap; ``p`` is two-sided."""
    n = len(a)
    diff = (sum(a) - sum(b)) / n if n else None
    if all(v in (0.0, 1.0) for v in (*a, *b)):
        a_only = sum(1 for x, y in zip(a, b) if x > y)
        b_only = sum(1 for x, y in zip(a, b) if y > x)
        return {
            "test": "mcnemar_exact",
            "n": n,
            "diff": diff,
            "a_only": a_only,
            "b_only": b_only,
            "p": mcnemar_exact(a_only, b_only),
        }
    return {
        "test": "paired_bootstrap",
        "n": n,
        "diff": diff,
        "iters": iters,
        "seed": seed,
        "p": paired_bootstrap(a, b, iters, seed),
    }
