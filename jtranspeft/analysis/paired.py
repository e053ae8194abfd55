"""Paired comparisons of two scorings of the SAME items: McNemar's exact test and a paired bootstrap.

Two adapters scored on identical test items are compared item by item, not through two independent
accuracies: only the discordant items (right under one, wrong under the other) carry information about the
difference, so paired tests resolve far smaller differences than two overlapping Wilson intervals. Every
function takes boolean (or 0/1) vectors aligned by item; `align` builds them from two predictions.jsonl
row lists and refuses pairs whose item ids differ.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def align(rows_a: Sequence[dict], rows_b: Sequence[dict], field: str = "correct") -> tuple[np.ndarray, np.ndarray]:
    """(a [n], b [n]) bool vectors of ``field`` from two lists of prediction rows, ordered by ``index``.

    Raises ValueError naming the first differing ids when the two lists do not hold the same items.
    """
    by_a = {row["index"]: bool(row[field]) for row in rows_a}
    by_b = {row["index"]: bool(row[field]) for row in rows_b}
    if by_a.keys() != by_b.keys():
        only_a, only_b = sorted(by_a.keys() - by_b.keys())[:5], sorted(by_b.keys() - by_a.keys())[:5]
        raise ValueError(f"paired comparison needs the same items: ids only in the first {only_a}, "
                         f"only in the second {only_b}")
    ids = sorted(by_a)
    return np.array([by_a[i] for i in ids]), np.array([by_b[i] for i in ids])


def _binomial_two_sided(k: int, n: int) -> float:
    """P(X <= min(k, n-k)) * 2 for X ~ Binomial(n, 1/2), capped at 1 (the exact McNemar p-value)."""
    if n == 0:
        return 1.0
    low = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(low + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def mcnemar_exact(a, b) -> dict:
    """McNemar's exact test of "a and b are equally often right" on paired items.

    ``b_only``: items b gets right and a wrong; ``a_only``: the reverse. Under the null each discordant item
    is a fair coin, so the two-sided p-value is the binomial tail of min(a_only, b_only) out of their sum.
    """
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"mcnemar_exact needs two equal-length vectors, got shapes {a.shape} and {b.shape}")
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    return {"a_only": a_only, "b_only": b_only, "discordant": a_only + b_only,
            "p_value": _binomial_two_sided(b_only, a_only + b_only)}


def paired_bootstrap(a, b, resamples: int = 10000, seed: int = 0, level: float = 0.95) -> dict:
    """The difference mean(b) - mean(a) with a percentile bootstrap CI that resamples ITEMS (pairs kept).

    Also a two-sided bootstrap p-value: twice the smaller share of resampled differences on either side
    of 0 (counting ties half), capped at 1.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_bootstrap needs two equal-length non-empty vectors, got {a.shape} and {b.shape}")
    diff_n = b - a
    picks_rn = np.random.default_rng(seed).integers(0, a.size, size=(resamples, a.size))
    means_r = diff_n[picks_rn].mean(axis=1)
    tail = (1.0 - level) / 2.0
    below = np.mean(means_r < 0) + 0.5 * np.mean(means_r == 0)
    return {"difference": float(diff_n.mean()), "ci_low": float(np.quantile(means_r, tail)),
            "ci_high": float(np.quantile(means_r, 1.0 - tail)), "resamples": resamples,
            "p_value": float(min(1.0, 2.0 * min(below, 1.0 - below)))}


def compare(a, b, resamples: int = 10000, seed: int = 0) -> dict:
    """Both tests of b against a on the same items: accuracies, difference with its paired 95% CI, p-values."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    boot = paired_bootstrap(a, b, resamples, seed)
    exact = mcnemar_exact(a, b)
    return {"n": int(a.size), "accuracy_a": float(a.mean()), "accuracy_b": float(b.mean()),
            "difference": boot["difference"], "ci_low": boot["ci_low"], "ci_high": boot["ci_high"],
            "p_bootstrap": boot["p_value"], "p_mcnemar": exact["p_value"],
            "a_only": exact["a_only"], "b_only": exact["b_only"]}
