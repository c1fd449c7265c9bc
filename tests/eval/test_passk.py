"""The pass@k estimator against its combinatorial definition, 1 - C(n-c, k) / C(n, k), in exact fractions."""
import fractions
import math

import pytest

from m1jax.eval.passk import mean_pass_at_k, pass_at_k


def exact_pass_at_k(n, c, k):
    return 1 - fractions.Fraction(math.comb(n - c, k), math.comb(n, k))


def test_matches_the_combinatorial_definition(rng):
    cases = [(1, 0, 1), (1, 1, 1), (5, 0, 5), (5, 5, 1), (7, 3, 5), (10, 9, 1), (200, 1, 100), (200, 199, 200)]
    for _ in range(200):
        n = int(rng.integers(1, 200))
        cases.append((n, int(rng.integers(0, n + 1)), int(rng.integers(1, n + 1))))
    for n, c, k in cases:
        # the product has at most c <= 200 factors, each rounded once: relative error below 200 * 2**-52
        assert pass_at_k(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)), rel=1e-12, abs=1e-12), (n, c, k)


def test_special_values_and_mean():
    assert pass_at_k(10, 0, 3) == 0.0 and pass_at_k(10, 8, 3) == 1.0
    assert pass_at_k(4, 1, 1) == 0.25  # pass@1 is the fraction correct
    assert mean_pass_at_k([(4, 1), (4, 3)], 1) == pytest.approx(0.5)


@pytest.mark.parametrize("n, c, k", [(3, 1, 4), (3, 4, 1), (0, 0, 1), (3, 1, 0)])
def test_impossible_counts_are_refused(n, c, k):
    with pytest.raises(ValueError, match="--samples|n >= 1"):
        pass_at_k(n, c, k)
