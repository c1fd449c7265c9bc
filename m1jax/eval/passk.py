"""The unbiased pass@k estimator of the HumanEval paper (Chen et al. 2021, arXiv 2107.03374).

With n samples of a problem of which c pass, the chance that at least one of k samples drawn without replacement
passes is

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

(the product form avoids huge binomials). The benchmark's pass@k is its mean over problems. It needs k <= n.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with n samples, c of them correct."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if not (n >= 1 and 0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs n >= 1, 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k} "
                         "(draw at least k samples per problem with --samples)")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given (n, c) per problem."""
    if not counts:
        raise ValueError("no problems to score")
    return float(np.mean([pass_at_k(n, c, k) for n, c in counts]))


def per_item_counts(records: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """(n, c) per item id from scored sample records: samples drawn, and samples fully correct (score == 1)."""
    per_item: dict[str, list[float]] = {}
    for record in records:
        per_item.setdefault(record["id"], []).append(record["score"])
    return [(len(scores), sum(s == 1.0 for s in scores)) for scores in per_item.values()]


def metric_table(summary: dict[str, Any]) -> str:
    """The pass@k entries of a summary as a markdown table, with the problem and sample counts."""
    rows = "".join(f"| {name} | {100 * value:.1f}% |\n" for name, value in summary.items() if name.startswith("pass@"))
    return (f"| metric | value |\n|---|---|\n{rows}\n{summary['problems']} problems x "
            f"{summary['samples_per_problem']} samples\n")
