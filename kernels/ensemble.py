"""Ensemble statistics over the member axis in a fixed summation order.

``torch.sum(x, 0)`` picks its accumulation strategy from the tensor's shape: the same column
summed inside a ``(N, 5)`` block and inside a ``(N, 10⁵)`` block can round differently (measured
here with torch 2.13). A distributed analysis holds the columns of the ensemble in rank-dependent
blocks, so its statistics would depend on the rank count. :func:`member_sum` adds the rows in a
pairwise tree of whole-row element-wise additions instead: every column sees the same additions
in the same order whatever block it sits in, so mean, variance and CRPS of a column are bitwise
the same for any split of the columns (and the tree keeps the rounding error O(log N)).
"""

from __future__ import annotations

import torch


def member_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the first axis in a fixed pairwise tree; ``(N, ...) -> (...)``.

    Level by level, row ``2i`` is added to row ``2i + 1``; an odd last row is carried up
    unchanged. N − 1 element-wise additions in ⌈log₂ N⌉ vectorised steps.
    """
    if x.shape[0] == 0:
        return x.new_zeros(x.shape[1:])
    while x.shape[0] > 1:
        even = x.shape[0] - x.shape[0] % 2
        pairs = x[0:even:2] + x[1:even:2]
        x = torch.cat([pairs, x[even:]]) if even < x.shape[0] else pairs
    return x[0]


def member_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the first axis (fixed order); ``(N, ...) -> (...)``."""
    return member_sum(x) / x.shape[0]


def member_var(x: torch.Tensor, mean: torch.Tensor | None = None, correction: int = 1) -> torch.Tensor:
    """Variance over the first axis (two-pass, fixed order); ``(N, ...) -> (...)``.

    Args:
        x: ``(N, ...)``.
        mean: the precomputed :func:`member_mean` of ``x``.
        correction: ``1`` for the unbiased ``N − 1`` divisor; with one member the divisor is 1.
    """
    n = x.shape[0]
    m = member_mean(x) if mean is None else mean
    return member_sum((x - m).square()) / max(n - correction, 1)
