"""Comparing float results: bit-equality of float reductions depends on the BLAS's thread count and on batching,
which change with the machine and its load, so results are compared to a stated fp32 tolerance and labels
exactly except at near-ties."""

from __future__ import annotations

import numpy as np

#: Probabilities after a softmax of cosines x a logit scale (up to ~100): a few fp32 ulps of the cosines.
PROB_ATOL = 1e-5


def assert_labels_equal_except_ties(
    actual: np.ndarray, expected: np.ndarray, probs: np.ndarray, prob_thd: float = 0.0, atol: float = PROB_ATOL
) -> None:
    """Labels H x W equal wherever the decision is not a near-tie within ``atol``: the two best of the C x H x W
    class probabilities, or the best one and the background threshold ``prob_thd``."""
    top = np.sort(probs, axis=0)
    tie = (top[-1] - top[-2] <= atol) | (np.abs(top[-1] - prob_thd) <= atol)
    wrong = (np.asarray(actual) != np.asarray(expected)) & ~tie
    assert not wrong.any(), f"{int(wrong.sum())} labels differ away from near-ties, first at {np.argwhere(wrong)[0]}"
    assert tie.mean() < 0.01, f"{tie.mean():.1%} of the pixels are near-ties: the comparison proves little"
