"""Scores -> numbers: accuracy over all samples with a confidence interval, unbiased pass@k, breakdowns.

Accuracy is the mean over every sample (problems x n), as Sky-T1 reported with n=8. Its 95% interval
is a percentile bootstrap over problems (samples of one problem are not independent, so problems are
what gets resampled); the normal approximation over per-problem means is given beside it.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021).

    Computed as a running product so it stays exact-ish for large n without big binomials.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def default_ks(n: int) -> list[int]:
    """pass@k reported for k = 1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    ks.append(n)
    return ks


def bootstrap_ci(per_problem: Sequence[float], weights: Sequence[int] | None = None, resamples: int = 2000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap of the sample-weighted mean, resampling problems with replacement."""
    x = np.asarray(per_problem, dtype=np.float64)  # (P,)
    if x.size == 0:
        return (float("nan"), float("nan"))
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64)  # (P,)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))  # (R, P)
    means = (x[idx] * w[idx]).sum(axis=1) / w[idx].sum(axis=1)  # (R,)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def normal_ci(per_problem: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    x = np.asarray(per_problem, dtype=np.float64)
    if x.size == 0:
        return (float("nan"), float("nan"))
    z = {0.90: 1.6448536, 0.95: 1.959964, 0.99: 2.5758293}.get(level)
    if z is None:
        raise ValueError(f"normal_ci supports levels 0.90, 0.95, 0.99, got {level}")
    mean = float(x.mean())
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")
    return (mean - z * se, mean + z * se)


def summarize(scores_by_problem: dict[str, list[float]], ks: Iterable[int] | None = None,
              seed: int = 0) -> dict:
    """Accuracy (mean over all samples) with intervals, and pass@k over problems that have >= k samples.

    scores_by_problem: problem id -> the scores (0/1, or fractions) of its samples.
    """
    problems = [pid for pid, s in scores_by_problem.items() if s]
    counts = [len(scores_by_problem[p]) for p in problems]
    per_problem = [float(np.mean(scores_by_problem[p])) for p in problems]
    total = sum(counts)
    correct = sum(sum(scores_by_problem[p]) for p in problems)
    out: dict = {
        "problems": len(problems),
        "samples": total,
        "accuracy": correct / total if total else float("nan"),
        "ci95_bootstrap": list(bootstrap_ci(per_problem, counts, seed=seed)),
        "ci95_normal": list(normal_ci(per_problem)),
    }
    n_min = min(counts) if counts else 0
    if n_min > 1:
        pk = {}
        for k in (ks if ks is not None else default_ks(n_min)):
            if k > n_min:
                continue
            vals = [pass_at_k(len(scores_by_problem[p]), int(round(sum(1 for s in scores_by_problem[p] if s >= 1.0))), k)
                    for p in problems]
            pk[f"pass@{k}"] = float(np.mean(vals))
        out["pass_at_k"] = pk
    return out


def breakdown(rows: Iterable[dict], key: str, seed: int = 0) -> dict[str, dict]:
    """summarize() per value of rows[key] (e.g. subject, level, difficulty); rows carry id and score."""
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        value = r.get("groups", {}).get(key)
        if value is None:
            continue
        groups[str(value)][r["id"]].append(float(r["score"]))
    return {g: summarize(dict(v), seed=seed) for g, v in sorted(groups.items(), key=lambda kv: _natural(kv[0]))}


def _natural(s: str) -> tuple:
    try:
        return (0, float(s), s)
    except ValueError:
        return (1, 0.0, s)
