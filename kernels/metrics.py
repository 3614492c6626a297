"""Verification metrics for ensembles and parameter posteriors. Pure functions of tensors.

Conventions: the member (sample) axis is always the first axis; the state axis, where a metric
averages over it, is the last.
"""

from __future__ import annotations

import math

import torch

from kernels.ensemble import member_mean, member_sum, member_var

__all__ = [
    "conformal_quantile",
    "conformal_min_cases",
    "credible_interval",
    "crps_ensemble",
    "interval_coverage",
    "interval_level",
    "param_summary",
    "quantile",
    "rank_histogram",
    "rmse",
    "spread",
    "verification_fields",
]


def rmse(estimate: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Root-mean-square error over the last (state) axis.

    Args:
        estimate: ``(..., D)``, e.g. the ensemble mean.
        truth: ``(..., D)``, broadcastable against ``estimate``.

    Returns:
        ``(...)``.
    """
    return (estimate - truth).square().mean(-1).sqrt()


def spread(ensemble: torch.Tensor) -> torch.Tensor:
    """Ensemble spread: the square root of the state-averaged unbiased (N−1) ensemble variance.

    This is the quantity to compare with :func:`rmse` of the ensemble mean (spread–skill).

    Args:
        ensemble: ``(N, ..., D)`` with ``N ≥ 2``.

    Returns:
        ``(...)``.
    """
    return member_var(ensemble).mean(-1).sqrt()


def crps_ensemble(ensemble: torch.Tensor, truth: torch.Tensor, *, fair: bool = True) -> torch.Tensor:
    """Continuous ranked probability score of an ensemble forecast, per scalar quantity.

    ``CRPS = E|X − y| − ½ E|X − X'|``. The pair term uses the identity
    ``Σ_i Σ_j |x_i − x_j| = 2 Σ_i (2i − N − 1) x_(i)`` over the sorted members, so the cost is a sort
    (O(N log N)) and memory stays O(N) per quantity instead of the O(N²) pair table. The *fair*
    estimator (Ferro 2014) divides the pair sum by ``N(N−1)`` instead of ``N²``, which makes it an
    unbiased estimate of the CRPS of the distribution the members are drawn from.

    Args:
        ensemble: ``(N, ...)``.
        truth: ``(...)``, broadcastable against one member.
        fair: the unbiased (fair) estimator; False gives the empirical-CDF CRPS.

    Returns:
        ``(...)``. With one member both estimators reduce to ``|x − y|``.
    """
    n = ensemble.shape[0]
    skill = member_mean((ensemble - truth).abs())
    if n < 2:
        return skill
    xs = torch.sort(ensemble, dim=0).values
    shape = (n,) + (1,) * (ensemble.ndim - 1)
    coef = (2 * torch.arange(1, n + 1, device=ensemble.device, dtype=ensemble.dtype) - n - 1).reshape(shape)
    pair_sum = 2.0 * member_sum(coef * xs)  # Σ_i Σ_j |x_i − x_j|
    denom = n * (n - 1) if fair else n * n
    return skill - pair_sum / (2.0 * denom)


def rank_histogram(
    ensemble: torch.Tensor, truth: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Talagrand rank histogram: where the truth falls among the sorted members.

    Args:
        ensemble: ``(N, K)`` for K verification cases (flatten extra axes first).
        truth: ``(K,)``.
        generator: with a generator, a truth tied with ``t`` members takes one of the ``t + 1``
            possible ranks uniformly at random (drawn on the CPU for reproducibility); without
            one, it adds ``1/(t+1)`` to each of them (the expected histogram, fractional counts).

    Returns:
        ``(N + 1,)`` float64 counts summing to K; bin r counts cases with r members below the truth.
    """
    n, k = ensemble.shape
    below = (ensemble < truth).sum(0)
    ties = (ensemble == truth).sum(0)
    if generator is not None:
        u = torch.rand(k, generator=generator, dtype=torch.float64).to(ensemble.device)
        rank = below + torch.floor(u * (ties + 1)).long().clamp_max(ties)
        return torch.bincount(rank, minlength=n + 1).to(torch.float64)
    # spread each case uniformly over ranks below..below+ties with a difference array
    share = 1.0 / (ties + 1).to(torch.float64)
    diff = torch.zeros(n + 2, dtype=torch.float64, device=ensemble.device)
    diff.index_add_(0, below, share)
    diff.index_add_(0, below + ties + 1, -share)
    return torch.cumsum(diff, 0)[: n + 1]


def quantile(samples: torch.Tensor, q: torch.Tensor | float, method: str = "linear") -> torch.Tensor:
    """Quantiles along the first (sample) axis, interpolated linearly between order statistics.

    Written with a sort so it has no size limit (``torch.quantile`` refuses large inputs).

    Args:
        samples: ``(N, ...)``.
        q: probability levels in [0, 1], a float or ``(Q,)``.
        method: where level ``q`` sits among the sorted samples (0-based): ``"linear"`` (numpy's
            default) at ``q (N − 1)``; ``"weibull"`` at ``q (N + 1) − 1``, clamped to the sample
            range, where a new draw from the samples' distribution falls below with probability
            ``q`` (``E F(X_(r)) = r/(N + 1)`` for the r-th of N draws).

    Returns:
        ``(...)`` for a float ``q``, else ``(Q, ...)``.
    """
    if method not in ("linear", "weibull"):
        raise ValueError(f"method must be 'linear' or 'weibull', got {method!r}")
    qt = torch.as_tensor(q, dtype=torch.float64)
    levels = qt.reshape(-1)
    if ((levels < 0) | (levels > 1)).any():
        raise ValueError(f"quantile levels must lie in [0, 1], got {qt.tolist()}")
    n = samples.shape[0]
    xs = torch.sort(samples, dim=0).values
    pos = levels * (n - 1) if method == "linear" else (levels * (n + 1) - 1).clamp(0, n - 1)
    lo = torch.floor(pos).long().clamp(0, n - 1)
    hi = (lo + 1).clamp_max(n - 1)
    frac = (pos - lo).to(samples.dtype).to(samples.device).reshape((-1,) + (1,) * (samples.ndim - 1))
    lo, hi = lo.to(samples.device), hi.to(samples.device)
    out = xs[lo] + frac * (xs[hi] - xs[lo])
    return out[0] if qt.ndim == 0 else out


def credible_interval(samples: torch.Tensor, level: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """Central (equal-tailed) credible interval from posterior samples.

    The bounds are the ``(1 ∓ level)/2`` quantiles at the Weibull positions (:func:`quantile`):
    a truth distributed as the posterior (a calibrated sampler) falls inside with probability
    ``level`` whatever N, as long as ``N ≥ 2/(1 − level) − 1`` (19 at 90 %); below that the
    interval is the sample range and covers ``(N − 1)/(N + 1)``. Numpy's default positions
    cover less with few samples: 85 % for a 90 % interval from 32 samples, 72 % from 8.

    Args:
        samples: ``(N, P)``.
        level: probability mass inside the interval, in (0, 1).

    Returns:
        ``(lo, hi)``, each ``(P,)``.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    q = quantile(samples, [(1.0 - level) / 2.0, (1.0 + level) / 2.0], method="weibull")
    return q[0], q[1]


def interval_level(n: int, level: float = 0.9) -> float:
    """The coverage a calibrated :func:`credible_interval` of ``level`` from ``n`` samples has:
    ``level``, or ``(n − 1)/(n + 1)`` when ``n`` is too small to place its bounds inside the
    samples."""
    return min(level, (n - 1) / (n + 1)) if n > 1 else 0.0


def interval_coverage(samples: torch.Tensor, truth: torch.Tensor, level: float = 0.9) -> torch.Tensor:
    """Whether the truth lies inside the central credible interval.

    Args:
        samples: ``(N, P)``.
        truth: ``(P,)``.
        level: interval mass.

    Returns:
        ``(P,)`` bool. Averaged over many cases it should be close to ``level`` when calibrated.
    """
    lo, hi = credible_interval(samples, level)
    return (lo <= truth) & (truth <= hi)


def _conformal_rank(n: int, level: float) -> int:
    # ⌈(n + 1)·level⌉, robust to the float product landing a hair above an integer (10·0.9)
    return math.ceil((n + 1) * level - 1e-9)


def conformal_min_cases(level: float = 0.9) -> int:
    """The fewest calibration cases :func:`conformal_quantile` needs for a finite bound at
    ``level`` (9 at 90 %, 19 at 95 %)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    n = 1
    while _conformal_rank(n, level) > n:
        n += 1
    return n


def conformal_quantile(scores: torch.Tensor, level: float = 0.9) -> torch.Tensor:
    """Split-conformal bound of nonconformity scores, per column.

    For ``n`` calibration cases with scores ``s_1..s_n`` the bound is the ``⌈(n + 1)·level⌉``-th
    smallest: a new case exchangeable with them has a score at or below it with probability at
    least ``level``, whatever the scores' distribution (Vovk et al. 2005; Lei et al. 2018). With
    the score ``|truth − mean| / std`` of a posterior, ``mean ± bound·std`` is an interval that
    keeps ``level`` over such cases even when the posterior itself is biased or too narrow.

    Args:
        scores: ``(n, P)``: one score per case and column.
        level: coverage, in (0, 1).

    Returns:
        ``(P,)``; ``inf`` where ``n`` is below :func:`conformal_min_cases`.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    n = scores.shape[0]
    k = _conformal_rank(n, level)
    if k > n:
        return torch.full(scores.shape[1:], math.inf, dtype=scores.dtype, device=scores.device)
    return scores.sort(0).values[k - 1]


def param_summary(samples: torch.Tensor, truth: torch.Tensor, level: float = 0.9) -> dict[str, torch.Tensor]:
    """Posterior summary of parameters against their true values.

    Args:
        samples: ``(N, P)`` posterior samples (particles) of P parameters.
        truth: ``(P,)``.
        level: credible-interval mass.

    Returns:
        dict of ``(P,)`` tensors: ``mean``, ``std`` (unbiased), ``lo`` and ``hi`` (the central
        interval), ``covered`` (bool), ``error`` (mean − truth) and ``crps`` (fair estimator).
    """
    lo, hi = credible_interval(samples, level)
    mean = samples.mean(0)
    return {
        "mean": mean,
        "std": samples.std(0, correction=1) if samples.shape[0] > 1 else torch.zeros_like(mean),
        "lo": lo,
        "hi": hi,
        "covered": (lo <= truth) & (truth <= hi),
        "error": mean - truth,
        "crps": crps_ensemble(samples, truth),
    }


def verification_fields(xf: torch.Tensor, xa: torch.Tensor, truth: torch.Tensor | None) -> torch.Tensor:
    """Per-component verification fields of a forecast and an analysis ensemble.

    Args:
        xf, xa: ``(N, C)``: every member, any block of state components.
        truth: ``(C,)`` or None.

    Returns:
        ``(F, C)``: forecast mean and variance, analysis mean and variance, and (with a truth)
        the analysis CRPS. Column-wise in the fixed order of :mod:`kernels.ensemble`, so a
        column's values do not depend on the block it was computed in.
    """
    mf, ma = member_mean(xf), member_mean(xa)
    rows = [mf, member_var(xf, mf), ma, member_var(xa, ma)]
    if truth is not None:
        rows.append(crps_ensemble(xa, truth))
    return torch.stack(rows)
