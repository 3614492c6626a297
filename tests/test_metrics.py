"""Metrics: CRPS against its O(N²) definition, rank histograms, interval coverage, RMSE/spread."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kernels.metrics import (
    conformal_min_cases,
    conformal_quantile,
    credible_interval,
    crps_ensemble,
    interval_coverage,
    interval_level,
    param_summary,
    quantile,
    rank_histogram,
    rmse,
    spread,
)


def _crps_brute(ens: torch.Tensor, y: torch.Tensor, fair: bool) -> torch.Tensor:
    n = ens.shape[0]
    pairs = (ens[:, None] - ens[None, :]).abs().sum((0, 1))
    return (ens - y).abs().mean(0) - pairs / (2 * (n * (n - 1) if fair else n * n))


@pytest.mark.parametrize("fair", [True, False])
def test_crps_matches_brute_force(device, dtype, fair):
    g = torch.Generator().manual_seed(0)
    ens = torch.randn(17, 4, 6, generator=g, dtype=torch.float64).to(device, dtype)
    y = torch.randn(4, 6, generator=g, dtype=torch.float64).to(device, dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    expected = _crps_brute(ens, y, fair)
    torch.testing.assert_close(crps_ensemble(ens, y, fair=fair), expected, rtol=tol, atol=tol)


def test_crps_point_mass_is_absolute_error(device, dtype):
    y = torch.tensor([0.0, 1.0, -2.0], dtype=dtype, device=device)
    x = torch.tensor([0.5, 1.0, 3.0], dtype=dtype, device=device)
    for n in (1, 2, 9):
        torch.testing.assert_close(crps_ensemble(x.expand(n, 3), y), (x - y).abs())


def test_crps_of_gaussian_ensemble_is_close_to_closed_form():
    # CRPS(N(0,1), y=0) = (√2 − 1)/√π; the fair estimator is unbiased, so a large ensemble is close
    g = torch.Generator().manual_seed(1)
    ens = torch.randn(4000, 50, generator=g, dtype=torch.float64)
    expected = (math.sqrt(2) - 1) / math.sqrt(math.pi)
    assert abs(crps_ensemble(ens, torch.zeros(50, dtype=torch.float64)).mean().item() - expected) < 5e-3


def test_rank_histogram_flat_for_exchangeable_truth():
    g = torch.Generator().manual_seed(2)
    n, k = 9, 20000
    ens = torch.randn(n, k, generator=g)
    truth = torch.randn(k, generator=g)
    counts = rank_histogram(ens, truth, generator=torch.Generator().manual_seed(3))
    assert counts.shape == (n + 1,)
    assert counts.sum().item() == k
    expected = k / (n + 1)
    # binomial sd ≈ 42 per bin; 5 sd leaves room without hiding a real skew
    assert (counts - expected).abs().max().item() < 5 * math.sqrt(expected)


def test_rank_histogram_ties():
    ens = torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]])  # truth 0 ties all members in case 0
    truth = torch.tensor([0.0, 10.0])
    split = rank_histogram(ens, truth)
    torch.testing.assert_close(split, torch.tensor([0.25, 0.25, 0.25, 1.25], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    many = sum(rank_histogram(ens, truth, generator=g) for _ in range(4000))
    assert many.sum().item() == 8000
    assert (many[:3] - 1000).abs().max().item() < 120 and 4800 < many[3].item() < 5200


def test_quantile_matches_torch():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(101, 7, generator=g, dtype=torch.float64)
    q = torch.tensor([0.0, 0.05, 0.5, 0.95, 1.0], dtype=torch.float64)
    torch.testing.assert_close(quantile(x, q), torch.quantile(x, q, dim=0))
    torch.testing.assert_close(quantile(x, 0.3), torch.quantile(x, 0.3, dim=0))


def test_interval_coverage_of_calibrated_posterior():
    # truth and samples from the same N(μ_p, 1) per parameter: the 90 % interval covers ~90 %
    g = torch.Generator().manual_seed(5)
    p = 4000
    mu = 3.0 * torch.randn(p, generator=g, dtype=torch.float64)
    samples = mu + torch.randn(2000, p, generator=g, dtype=torch.float64)
    truth = mu + torch.randn(p, generator=g, dtype=torch.float64)
    cov = interval_coverage(samples, truth, 0.9)
    assert cov.dtype == torch.bool and cov.shape == (p,)
    assert abs(cov.double().mean().item() - 0.9) < 0.02
    lo, hi = credible_interval(samples, 0.9)
    width = torch.tensor(2 * 1.6449, dtype=torch.float64)  # 2 z_0.95 for unit variance
    torch.testing.assert_close((hi - lo).mean(), width, atol=0.03, rtol=0)


def test_interval_from_few_samples_keeps_its_level():
    # a calibrated sampler: the truth is one more draw from the samples' distribution. With
    # numpy's default positions a 90 % interval from 32 samples covers 85 %, from 8 only 72 %.
    g = torch.Generator().manual_seed(11)
    cases = 40000
    for n, want in ((32, 0.9), (19, 0.9), (8, 7 / 9)):
        draws = torch.randn(n + 1, cases, generator=g, dtype=torch.float64)
        cov = interval_coverage(draws[:n], draws[n], 0.9).double().mean().item()
        assert abs(cov - want) < 0.01, (n, cov)
        assert interval_level(n, 0.9) == pytest.approx(want)
        if n == 32:
            lin = quantile(draws[:n], torch.tensor([0.05, 0.95], dtype=torch.float64))
            assert ((lin[0] <= draws[n]) & (draws[n] <= lin[1])).double().mean().item() < 0.87
    x = torch.randn(32, 3, generator=g, dtype=torch.float64)
    q = torch.tensor([0.0, 0.03, 0.05, 0.5, 0.95, 0.99, 1.0], dtype=torch.float64)
    want_q = np.quantile(x.numpy(), q.numpy(), axis=0, method="weibull")
    torch.testing.assert_close(quantile(x, q, method="weibull"), torch.from_numpy(want_q))


def test_conformal_bound_covers_a_biased_overconfident_posterior():
    """Posteriors whose mean is off by 1.5 sds and whose sd is half the error's: their own
    90 % interval covers far less; mean ± bound·sd from n earlier cases covers ⌈(n+1)·0.9⌉/(n+1)
    of new ones (exchangeable, continuous scores), whatever the miscalibration."""
    g = torch.Generator().manual_seed(5)
    trials = 40000
    for n, want in ((9, 0.9), (20, 19 / 21), (40, 37 / 41)):
        err = 1.5 + 2.0 * torch.randn(n + 1, trials, generator=g, dtype=torch.float64)
        score = err.abs()                           # |truth − mean| / sd with sd = 1
        bound = conformal_quantile(score[:n], 0.9)  # (trials,)
        cov = (score[n] <= bound).double().mean().item()
        assert abs(cov - want) < 0.006, (n, cov)
        assert (score[n] <= 1.645).double().mean().item() < 0.55  # the posterior's own interval
    # the rank: the 9th of 9 at 90 %, the 18th of 19; too few cases give no finite bound
    s = torch.arange(1.0, 20.0).flip(0)[:, None]
    assert conformal_quantile(s[:9], 0.9).item() == s[:9].max().item()
    assert conformal_quantile(s, 0.9).item() == 18.0
    assert math.isinf(conformal_quantile(s[:8], 0.9).item())
    assert (conformal_min_cases(0.9), conformal_min_cases(0.95), conformal_min_cases(0.8)) == (9, 19, 4)
    with pytest.raises(ValueError, match="level"):
        conformal_quantile(s, 1.0)


def test_param_summary():
    samples = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0], [5.0, 50.0]])
    out = param_summary(samples, torch.tensor([3.0, 100.0]), level=0.5)
    torch.testing.assert_close(out["mean"], torch.tensor([3.0, 30.0]))
    torch.testing.assert_close(out["std"], samples.std(0))
    # the 25 % and 75 % levels at Weibull positions q (N + 1): ranks 1.5 and 4.5 of 5
    torch.testing.assert_close(out["lo"], torch.tensor([1.5, 15.0]))
    torch.testing.assert_close(out["hi"], torch.tensor([4.5, 45.0]))
    assert out["covered"].tolist() == [True, False]
    torch.testing.assert_close(out["error"], torch.tensor([0.0, -70.0]))


def test_rmse_and_spread(device, dtype):
    truth = torch.zeros(2, 4, dtype=dtype, device=device)
    est = torch.tensor([[1.0, -1.0, 1.0, -1.0], [3.0, 0.0, 0.0, 4.0]], dtype=dtype, device=device)
    torch.testing.assert_close(rmse(est, truth), torch.tensor([1.0, 2.5], dtype=dtype, device=device))
    # members ±1 around 0 (N = 2): unbiased variance 2 at every point
    ens = torch.stack([torch.ones(3, 5), -torch.ones(3, 5)]).to(device, dtype)
    torch.testing.assert_close(spread(ens), torch.full((3,), math.sqrt(2.0), dtype=dtype, device=device))
