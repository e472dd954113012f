"""The unbiased pass@k estimator (Chen et al. 2021) against hand-computed values."""
from __future__ import annotations

from math import comb

import pytest

from spinlm.evaluate import pass_at_k


@pytest.mark.parametrize("n, correct, k, expected", [
    (4, 0, 4, 0.0),
    (4, 1, 4, 1.0),            # k = n: pass@k is "any of the n right"
    (4, 1, 1, 0.25),           # k = 1: the fraction right
    (5, 2, 2, 1 - 3 / 10),     # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 3, 4, 1 - 35 / 210),  # 1 - C(7,4)/C(10,4)
    (3, 3, 2, 1.0),
    (200, 13, 100, 1 - comb(187, 100) / comb(200, 100)),  # large n: the product form, no overflow
])
def test_pass_at_k_hand_values(n, correct, k, expected):
    assert pass_at_k(n, correct, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n, correct, k", [(4, 5, 2), (4, -1, 2), (4, 1, 5), (4, 1, 0)])
def test_pass_at_k_rejects_impossible_counts(n, correct, k):
    with pytest.raises(ValueError, match=f"n={n}, correct={correct}, k={k}"):
        pass_at_k(n, correct, k)
