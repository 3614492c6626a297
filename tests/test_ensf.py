"""EnSF analysis: schedule, estimators, batch independence, regression, a Lorenz-96 twin.

Measured accuracy on the linear-Gaussian problem below (N = 600–1000, D = 4, steps = 100, float64;
observed components, σ = 0.3 unless stated):

* The EnSF posterior-score approximation ``prior score + (1 − t) ∇ log p(y | x)`` is biased even
  with the exact Gaussian prior score: it evaluates the likelihood at ``x_t ≈ α_t x_0`` rather
  than at ``x_0``. With σ = 1 (weak data) its mean moves 60–110 % of the Kalman shift, depending
  on the prior variance; with σ = 0.3 the mean is within about 0.1 of Kalman and the variance
  within 25 %. The *mixture* estimator reproduces the mean of that Gaussian-score reference to
  Monte-Carlo error (differences ≤ 0.035); its variance is 0.01–0.03 larger (kernel smoothing
  of the finite ensemble plus the last step's √Δt jitter), which lands it within 5–25 % of the
  Kalman variance. The Kalman comparison is the loose check.
* The *paired* estimator hardly moves the ensemble unless ``Δt/σ² ≳ 1`` (``Δt = 1/steps``): its
  update is about one likelihood-gradient step of length ``Δt`` taken at the end of the reverse
  SDE. With σ = 0.1 and 100 steps the mean covers about a third of the prior-to-Kalman distance,
  with σ = 0.3 under 10 %, with σ = 1 nothing. The test asserts only that it reduces the error.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from kernels.dynamics.lorenz96 import Lorenz96
from kernels.ensf import (
    EnSFSettings,
    denoised_mean,
    ensf_analysis,
    gm_score,
    gm_weights,
    inflate,
    likelihood_weight,
    mixture_score,
    mixture_weights,
    regress_local,
    regress_unobserved,
    rtps,
    schedule,
)
from kernels.streams import generator

F64 = torch.float64


def _gens(n: int, seed: int = 0, cycle: int = 0, members: range | None = None) -> list[torch.Generator]:
    return [generator(seed, cycle, i) for i in (members if members is not None else range(n))]


# --------------------------------------------------------------------------------------------
# settings and schedule
@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": 0},
        {"steps": -3},
        {"steps": 2.5},
        {"eps_alpha": 0.0},
        {"eps_alpha": 1.5},
        {"eps_beta": -0.1},
        {"eps_beta": 1.1},
        {"estimator": "kernel"},
        {"mixture_size": 0},
        {"score_clip": 0.0},
        {"h_power": -1.0},
        {"init": "zeros"},
        {"chunk": 0},
        {"estimator": "kde"},
        {"gm_bandwidth": 0.0},
        {"gm_bandwidth": 1.5, "gm_shrink": True},
        {"likelihood": "exact"},
        {"sampler": "heun"},
    ],
)
def test_bad_settings_raise(kwargs):
    with pytest.raises(ValueError):
        EnSFSettings(**kwargs)


def test_schedule_end_points_and_coefficients():
    a1, b1, _, _ = schedule(1.0, 0.05, 0.0)
    a0, b0, _, _ = schedule(0.0, 0.05, 0.0)
    assert (a1, b1, a0, b0) == (pytest.approx(0.05), 1.0, 1.0, 0.0)
    # g² = dβ²/dt − 2 (dlogα/dt) β², checked against finite differences of the schedule
    t, h = 0.37, 1e-6
    alpha, beta2, f, g2 = schedule(t, 0.05, 0.01)
    ap, bp, _, _ = schedule(t + h, 0.05, 0.01)
    am, bm, _, _ = schedule(t - h, 0.05, 0.01)
    assert f == pytest.approx((math.log(ap) - math.log(am)) / (2 * h), rel=1e-7)
    assert g2 == pytest.approx((bp - bm) / (2 * h) - 2 * f * beta2, rel=1e-7)
    assert likelihood_weight(1.0) == 0.0 and likelihood_weight(0.25, 2.0) == pytest.approx(0.5625)


# --------------------------------------------------------------------------------------------
# linear-Gaussian analytic case
def _linear_gaussian(sigma: float, n: int = 1000):
    g = torch.Generator().manual_seed(1)
    mean = torch.tensor([0.5, -0.3, 1.0, 0.0], dtype=F64)
    sd = torch.tensor([1.0, 0.7, 1.5, 1.0], dtype=F64)
    x0 = mean + sd * torch.randn(n, 4, generator=g, dtype=F64)
    y = torch.tensor([1.5, -1.0, 0.0, 0.0], dtype=F64)
    obs = torch.tensor([True, True, True, False])

    def lik_grad(x: torch.Tensor) -> torch.Tensor:
        return torch.where(obs, (y - x) / sigma**2, torch.zeros_like(x))

    pm, pv = x0.mean(0), x0.var(0)
    km = torch.where(obs, (pm / pv + y / sigma**2) / (1 / pv + 1 / sigma**2), pm)
    kv = torch.where(obs, 1 / (1 / pv + 1 / sigma**2), pv)
    return x0, lik_grad, km, kv


def _gaussian_score_reference(x0, lik_grad, s: EnSFSettings, n: int = 10000):
    """The same reverse SDE with the exact score of the Gaussian fitted to ``x0``."""
    g = torch.Generator().manual_seed(7)
    pm, pv = x0.mean(0), x0.var(0)
    x = torch.randn(n, x0.shape[1], generator=g, dtype=F64)
    dt = 1.0 / s.steps
    for k in range(s.steps):
        t = 1.0 - k * dt
        alpha, beta2, f, g2 = schedule(t, s.eps_alpha, s.eps_beta)
        score = -(x - alpha * pm) / (alpha**2 * pv + beta2) + likelihood_weight(t) * lik_grad(x)
        noise = torch.randn(x.shape, generator=g, dtype=F64)
        x = x - f * x * dt + g2 * dt * score + math.sqrt(g2 * dt) * noise
    return x


def test_mixture_matches_gaussian_score_reference_and_approaches_kalman():
    x0, lik_grad, km, kv = _linear_gaussian(0.3, n=600)
    s = EnSFSettings(steps=100, estimator="mixture")
    xa = ensf_analysis(x0, lik_grad, s, _gens(len(x0)))
    ref = _gaussian_score_reference(x0, lik_grad, s)
    # 4 Monte-Carlo standard errors of an N-member mean, plus the small systematic difference
    # between the kernel-smoothed empirical prior and its Gaussian fit (measured about 0.03)
    mc = 4 * (ref.var(0) / len(x0)).sqrt() + 0.03
    assert ((xa.mean(0) - ref.mean(0)).abs() < mc).all(), (xa.mean(0), ref.mean(0))
    # the variance sits 0.01–0.03 above the reference: kernel smoothing of 600 members and the
    # last step's √Δt jitter (measured ratios 1.17–1.6 on the observed components)
    ratio = xa.var(0) / ref.var(0)
    assert ((ratio > 0.9) & (ratio < 1.8)).all(), (xa.var(0), ref.var(0))
    # the EnSF approximation itself: close to Kalman, not exact (see the module docstring)
    assert ((xa.mean(0) - km).abs() < 0.15).all(), (xa.mean(0), km)
    assert ((xa.var(0) / kv - 1).abs() < 0.35).all(), (xa.var(0), kv)


def test_paired_moves_toward_kalman_by_about_dt_over_sigma2():
    x0, lik_grad, km, _ = _linear_gaussian(0.1)
    prior_err = (x0.mean(0) - km).abs()[:3]
    xa = ensf_analysis(x0, lik_grad, EnSFSettings(steps=100, estimator="paired"), _gens(len(x0)))
    err = (xa.mean(0) - km).abs()[:3]
    assert (err < 0.85 * prior_err).all() and (err > 0.3 * prior_err).all(), (err, prior_err)
    # the unobserved component keeps its prior members (paired: no information reaches it)
    assert (xa[:, 3] - x0[:, 3]).abs().max() < 0.6


def _shift_and_var(xa, x0, km, kv):
    """Fraction of the prior-to-Kalman mean shift covered, and posterior / Kalman variance."""
    pm = x0.mean(0)
    return ((xa.mean(0) - pm) / (km - pm))[:3], (xa.var(0) / kv)[:3]


@pytest.mark.parametrize("seed", [0, 2])
def test_gaussian_denoised_weak_data_is_near_kalman(seed):
    # DPS with a Gaussian prior drops the posterior variance C_{0|t} = vβ²/(α²v + β²) from the
    # likelihood's covariance (it uses R instead of R + C_{0|t}); the error is O(v/σ²), small for
    # weak data. Measured (N = 2000, σ = 3, seeds 0–2), mean error in Monte-Carlo standard errors
    # √(P_a/N): denoised |err| ≤ 2.1 on every component, damped up to 4.9 (on the component with
    # the largest prior variance); variance ratio denoised 0.96–1.05.
    x0, lik_grad, km, kv = _linear_gaussian(3.0, n=2000)
    s = EnSFSettings(estimator="gaussian", likelihood="denoised")
    xa = ensf_analysis(x0, lik_grad, s, _gens(2000, seed=seed))
    err = (xa.mean(0) - km) / (kv / 2000).sqrt()
    assert (err.abs() < 3.0).all(), err
    assert ((xa.var(0) / kv - 1).abs() < 0.08).all(), xa.var(0) / kv


@pytest.mark.parametrize("likelihood", ["damped", "denoised"])
def test_gaussian_prior_linear_gaussian_vs_kalman(likelihood):
    # σ = 0.3 (prior variance/σ² = 5–25), N = 2000, 100 steps, measured:
    #   damped:   shift 0.99–1.10 of Kalman's, variance ratio 0.59–0.63
    #   denoised: shift 1.04–1.18,            variance ratio 0.54–0.66
    # neither is exact for strong data: both overweight the likelihood at intermediate t.
    x0, lik_grad, km, kv = _linear_gaussian(0.3, n=2000)
    s = EnSFSettings(estimator="gaussian", likelihood=likelihood)
    shift, var = _shift_and_var(ensf_analysis(x0, lik_grad, s, _gens(2000)), x0, km, kv)
    assert ((shift > 0.9) & (shift < 1.3)).all() and ((var > 0.45) & (var < 0.8)).all(), (shift, var)
    # the unobserved component keeps the prior's distribution
    xa = ensf_analysis(x0, lik_grad, s, _gens(2000))
    assert abs(float(xa[:, 3].mean() - x0[:, 3].mean())) < 0.1
    assert 0.85 < float(xa[:, 3].var() / x0[:, 3].var()) < 1.15


def test_denoised_mean_end_points():
    m, v = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([0.5, 4.0], dtype=F64)
    x = torch.tensor([[3.0, 0.0]], dtype=F64)
    mu, jac = denoised_mean(x, m, v, 1.0, 0.0)  # t = 0: no noise, the state is its own mean
    torch.testing.assert_close(mu, x)
    torch.testing.assert_close(jac, torch.ones(2, dtype=F64))
    mu, jac = denoised_mean(x, m, v, 1e-12, 1.0)  # t = 1: no signal, the prior mean
    torch.testing.assert_close(mu, m[None], rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------------
# Gaussian-mixture numerics
def test_gm_reduces_to_gaussian_and_to_mixture():
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(9, 13, generator=g, dtype=F64)
    x = torch.randn(5, 13, generator=g, dtype=F64)
    var_t = 0.3 + torch.rand(13, generator=g, dtype=F64)
    alpha = 0.7
    # one component (or several identical ones): the diagonal Gaussian score
    m = x0.mean(0, keepdim=True)
    gauss = (alpha * m - x) / var_t
    torch.testing.assert_close(gm_score(x, m, alpha, var_t), gauss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gm_score(x, m.expand(4, -1), alpha, var_t), gauss, rtol=1e-12, atol=1e-12)
    # isotropic component variance β²: the empirical mixture score
    iso = torch.full((13,), 0.4, dtype=F64)
    torch.testing.assert_close(gm_score(x, x0, alpha, iso), mixture_score(x, x0, alpha, 0.4),
                               rtol=1e-10, atol=1e-10)
    # weights against a direct evaluation of the Gaussian densities
    logp = -0.5 * (((x[:, None] - alpha * x0[None]) ** 2) / var_t).sum(-1)
    torch.testing.assert_close(gm_weights(x, x0, alpha, var_t), torch.softmax(logp, 1),
                               rtol=1e-10, atol=1e-12)
    # the analysis: gm with shrunk means and h = 1 is the gaussian estimator
    def lik(z):
        return -(z - 1.0) / 0.25
    a = ensf_analysis(x0, lik, EnSFSettings(steps=20, estimator="gaussian"), _gens(9))
    b = ensf_analysis(x0, lik, EnSFSettings(steps=20, estimator="gm", gm_shrink=True), _gens(9))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gm_weights_finite_and_exact_for_huge_distances():
    g = torch.Generator().manual_seed(12)
    x0 = torch.randn(50, 8, generator=g, dtype=F64)
    x = x0[:5] + 0.3 * torch.randn(5, 8, generator=g, dtype=F64) + 1e4
    alpha = 0.8
    var_t = 0.02 + 0.1 * torch.rand(8, generator=g, dtype=F64)
    logits = -0.5 * (((x[:, None] - alpha * x0[None]) ** 2) / var_t).sum(-1)
    assert torch.exp(logits).sum() == 0  # a naive normalisation would be 0/0
    torch.testing.assert_close(gm_weights(x, x0, alpha, var_t, chunk=3), torch.softmax(logits, 1),
                               rtol=1e-9, atol=1e-12)
    w32 = gm_weights(x.float(), x0.float(), alpha, var_t.float())
    assert torch.isfinite(w32).all()
    torch.testing.assert_close(w32.sum(1), torch.ones(5))
    assert torch.isfinite(gm_score(x.float(), x0.float(), alpha, var_t.float())).all()
    # a whole analysis started far away stays finite
    lik = lambda z: -(z - 1e4) / 0.01  # noqa: E731
    out = ensf_analysis(x0.float(), lik, EnSFSettings(steps=20, estimator="gm", score_clip=100.0), _gens(50))
    assert torch.isfinite(out).all()


def test_gm_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(13)
    x0 = torch.randn(30, 37, generator=g, dtype=F64)
    x = torch.randn(12, 37, generator=g, dtype=F64)
    var_t = 0.2 + torch.rand(37, generator=g, dtype=F64)
    torch.testing.assert_close(gm_score(x, x0, 0.6, var_t, chunk=5), gm_score(x, x0, 0.6, var_t),
                               rtol=1e-12, atol=1e-12)

    def lik(z):
        return -(z - 1.0) / 0.25

    for kw in ({"estimator": "gm", "gm_bandwidth": 0.5}, {"estimator": "gm", "mixture_size": 7},
               {"estimator": "gm", "gm_shrink": True, "gm_bandwidth": 0.3, "likelihood": "denoised"},
               {"estimator": "gaussian", "likelihood": "denoised", "sampler": "ode"}):
        runs = [ensf_analysis(x0, lik, EnSFSettings(steps=20, chunk=c, **kw), _gens(30))
                for c in (1 << 16, 6)]
        torch.testing.assert_close(runs[1], runs[0], rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# mixture numerics
def test_mixture_weights_finite_and_exact_for_huge_distances():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(50, 8, generator=g, dtype=F64)
    x = x0[:5] + 0.3 * torch.randn(5, 8, generator=g, dtype=F64) + 1e4
    alpha, beta2 = 0.8, 0.05
    logits = -((x[:, None] - alpha * x0[None]) ** 2).sum(-1) / (2 * beta2)
    assert torch.exp(logits).sum() == 0  # a naive normalisation would be 0/0
    w = mixture_weights(x, x0, alpha, beta2, chunk=3)
    torch.testing.assert_close(w, torch.softmax(logits, 1), rtol=1e-9, atol=1e-12)
    w32 = mixture_weights(x.float(), x0.float(), alpha, beta2)
    assert torch.isfinite(w32).all()
    torch.testing.assert_close(w32.sum(1), torch.ones(5))
    assert torch.isfinite(mixture_score(x.float(), x0.float(), alpha, beta2)).all()


def test_mixture_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(30, 37, generator=g, dtype=F64)
    x = torch.randn(12, 37, generator=g, dtype=F64)
    full = mixture_score(x, x0, 0.6, 0.4)
    torch.testing.assert_close(mixture_score(x, x0, 0.6, 0.4, chunk=5), full, rtol=1e-12, atol=1e-12)

    def lik(z):
        return -(z - 1.0) / 0.25

    runs = [ensf_analysis(x0, lik, EnSFSettings(steps=20, estimator="mixture", mixture_size=m, chunk=c),
                          _gens(30)) for m in (None, 7) for c in (1 << 16, 6)]
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(runs[3], runs[2], rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# randomness and batch independence
@pytest.mark.parametrize("clip", [None, 5.0])
def test_paired_member_is_bitwise_batch_independent(device, dtype, clip):
    n, d = 7, 37  # d deliberately not a multiple of any SIMD width
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(n, d, generator=g, dtype=F64).to(device=device, dtype=dtype)
    y = torch.randn(d, generator=g, dtype=F64).to(device=device, dtype=dtype)

    def lik(x):
        return (y - torch.atan(x)) / (0.01 * (1 + x * x))

    # a small noise block forces several blocks per analysis
    s = EnSFSettings(steps=30, estimator="paired", score_clip=clip, noise_block=3 * d)
    batch = ensf_analysis(x0, lik, s, _gens(n, seed=9, cycle=2))
    assert torch.isfinite(batch).all()
    for i in (0, 4):
        alone = ensf_analysis(x0[i:i + 1], lik, s, _gens(1, seed=9, cycle=2, members=range(i, i + 1)))
        assert torch.equal(alone[0], batch[i])
    again = ensf_analysis(x0, lik, s, _gens(n, seed=9, cycle=2))
    assert torch.equal(again, batch)


def test_wrong_generator_count_raises():
    with pytest.raises(ValueError):
        ensf_analysis(torch.zeros(3, 4), torch.zeros_like, EnSFSettings(), _gens(2))


# --------------------------------------------------------------------------------------------
# post-processing
def test_inflate_and_rtps():
    g = torch.Generator().manual_seed(6)
    prior = 2.0 * torch.randn(40, 9, generator=g, dtype=F64)
    post = 0.5 * torch.randn(40, 9, generator=g, dtype=F64) + 1.0
    inf = inflate(post, 1.3)
    torch.testing.assert_close(inf.mean(0), post.mean(0))
    torch.testing.assert_close(inf.std(0), 1.3 * post.std(0))
    torch.testing.assert_close(rtps(prior, post, 0.0), post)
    full = rtps(prior, post, 1.0)
    torch.testing.assert_close(full.std(0), prior.std(0))
    torch.testing.assert_close(full.mean(0), post.mean(0))


def test_regress_unobserved_recovers_linear_update():
    g = torch.Generator().manual_seed(8)
    n, r = 60, 6
    a = torch.randn(n, r, generator=g, dtype=F64)
    coef = torch.randn(r, 4, generator=g, dtype=F64)
    u = a @ coef + 0.7  # unobserved components: exact linear functions of the observed ones
    # interleave observed and unobserved columns so chunk boundaries cut through both
    d = r + 4
    observed = torch.zeros(d, dtype=torch.bool)
    observed[[0, 2, 3, 5, 7, 9]] = True
    prior = torch.empty(n, d, dtype=F64)
    prior[:, observed], prior[:, ~observed] = a, u
    delta = 0.3 * torch.randn(n, r, generator=g, dtype=F64)
    post = prior.clone()
    post[:, observed] += delta
    post[:, ~observed] += 100.0  # garbage the regression must replace

    exact = prior.clone()
    exact[:, observed] += delta
    exact[:, ~observed] += delta @ coef
    out = regress_unobserved(prior, post, observed, ridge=0.0)
    torch.testing.assert_close(out, exact, rtol=1e-9, atol=1e-9)
    out_ridge = regress_unobserved(prior, post, observed, ridge=1e-10)
    torch.testing.assert_close(out_ridge, exact, rtol=1e-6, atol=1e-6)
    chunked = regress_unobserved(prior, post, observed, ridge=1e-3, chunk=3)
    torch.testing.assert_close(chunked, regress_unobserved(prior, post, observed, ridge=1e-3),
                               rtol=1e-12, atol=1e-12)


def _local_case(n: int = 400, seed: int = 9):
    """Ring of 12 points, even ones observed; odd point j is 1.5·x_{j-1} − 0.5·x_{j+1} + noise."""
    g = torch.Generator().manual_seed(seed)
    d = 12
    obs = torch.arange(0, d, 2)
    tgt = torch.arange(1, d, 2)
    prior = torch.randn(n, d, generator=g, dtype=F64)
    prior[:, tgt] = (1.5 * prior[:, tgt - 1] - 0.5 * prior[:, (tgt + 1) % d]
                     + 1e-3 * torch.randn(n, tgt.numel(), generator=g, dtype=F64))
    post = prior.clone()
    post[:, obs] += 0.3 * torch.randn(n, obs.numel(), generator=g, dtype=F64)
    post[:, tgt] += 100.0  # garbage the regression must replace
    # every target's two observed neighbours (positions in `obs`), then a far one
    left, right = (tgt - 1) // 2, ((tgt + 1) % d) // 2
    far = (left + 3) % obs.numel()
    index = torch.stack([left, right, far], 1)
    return prior, post, obs, tgt, index


def test_regress_local_recovers_the_local_linear_update():
    prior, post, obs, tgt, index = _local_case()
    delta = post[:, obs] - prior[:, obs]
    exact = post.clone()
    exact[:, tgt] = prior[:, tgt] + 1.5 * delta[:, index[:, 0]] - 0.5 * delta[:, index[:, 1]]
    # full weight on both neighbours, none on the far one: the exact local coefficients
    w = torch.tensor([1.0, 1.0, 0.0], dtype=F64).expand(tgt.numel(), 3)
    out = regress_local(prior, post, obs, tgt, index, w, ridge=1e-9)
    torch.testing.assert_close(out, exact, rtol=0, atol=2e-3)
    # observed columns keep the posterior; chunking changes nothing
    assert torch.equal(out[:, obs], post[:, obs])
    chunked = regress_local(prior, post, obs, tgt, index, w, ridge=1e-9, chunk=2)
    torch.testing.assert_close(chunked, out, rtol=1e-12, atol=1e-12)


def test_regress_local_taper_shrinks_and_zero_weight_excludes():
    prior, post, obs, tgt, index = _local_case(n=30)
    ones = torch.ones(tgt.numel(), 3, dtype=F64)
    # a weight of 0 is an infinite penalty: the regressor does not exist
    none = regress_local(prior, post, obs, tgt, index, torch.zeros_like(ones), ridge=1e-3)
    torch.testing.assert_close(none[:, tgt], prior[:, tgt], rtol=0, atol=0)
    only_left = regress_local(prior, post, obs, tgt, index[:, :1],
                              torch.ones(tgt.numel(), 1, dtype=F64), ridge=1e-3)
    w0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64).expand(tgt.numel(), 3)
    torch.testing.assert_close(regress_local(prior, post, obs, tgt, index, w0, ridge=1e-3),
                               only_left, rtol=1e-12, atol=1e-12)
    # with few members, the far regressor picks up sampling noise; a small weight damps it
    move = lambda out: (out[:, tgt] - prior[:, tgt]).norm()  # noqa: E731
    weak = torch.tensor([1.0, 1.0, 1e-4], dtype=F64).expand(tgt.numel(), 3)
    a = regress_local(prior, post, obs, tgt, index, ones, ridge=1e-2)
    b = regress_local(prior, post, obs, tgt, index, weak, ridge=1e-2)
    c = regress_local(prior, post, obs, tgt, index, w0 + torch.tensor([0, 1.0, 0], dtype=F64), ridge=1e-2)
    assert (b - c).abs().max() < (a - c).abs().max() and move(b) > 0
    with pytest.raises(ValueError, match="ridge"):
        regress_local(prior, post, obs, tgt, index, ones, ridge=0.0)
    with pytest.raises(ValueError, match="targets"):
        regress_local(prior, post, obs, tgt[:-1], index, ones)


# --------------------------------------------------------------------------------------------
# Lorenz-96 twin experiment
@functools.lru_cache(maxsize=8)
def _l96_twin(settings: EnSFSettings, d: int = 40, n: int = 20, cycles: int = 30, sigma: float = 0.05):
    """Arctan observations of every variable, σ = 0.05, every 10 RK4 steps of 0.01."""
    model = Lorenz96(d)
    g = torch.Generator().manual_seed(0)
    theta = model.truth_theta(n, dtype=F64)
    truth = model.advance(model.initial_state(1, g, dtype=F64), theta[:1], 1000, dt=0.01)
    ens = truth + torch.randn(n, d, generator=g, dtype=F64)
    free = ens.clone()
    errors = []
    for c in range(cycles):
        truth = model.advance(truth, theta[:1], 10, dt=0.01)
        ens = model.advance(ens, theta, 10, dt=0.01)
        free = model.advance(free, theta, 10, dt=0.01)
        y = torch.atan(truth[0]) + sigma * torch.randn(d, generator=g, dtype=F64)

        def lik(x, y=y):
            return (y - torch.atan(x)) / (sigma**2 * (1 + x * x))

        ens = ensf_analysis(ens, lik, settings, _gens(n, seed=0, cycle=c))
        errors.append(float((ens.mean(0) - truth[0]).pow(2).mean().sqrt()))
    free_rmse = float((free.mean(0) - truth[0]).pow(2).mean().sqrt())
    return sum(errors[-10:]) / 10, free_rmse


@pytest.mark.parametrize("estimator", ["paired", "mixture"])
def test_lorenz96_twin_tracks_truth(estimator):
    # a small ε_β keeps the last steps' prior pull finite; measured (seeds 0–2) paired 0.57–0.89,
    # mixture 0.72–0.81, free run 3.1–3.3; with ε_β = 0: paired 1.1, mixture 0.8
    rmse, free = _l96_twin(EnSFSettings(steps=100, eps_beta=1e-3, estimator=estimator))
    # arctan obs with σ = 0.05 correspond to a state error σ(1 + x²) ≈ 1 on average
    assert rmse < 1.0 and rmse < 0.35 * free, (rmse, free)


RECOMMENDED = EnSFSettings(estimator="gaussian", likelihood="denoised", score_clip=50.0, init="prior")


def test_lorenz96_twin_recommended_beats_paired():
    # measured (d = 40, 30 cycles, seed 0): RECOMMENDED 0.106, paired (ε_β = 1e-3) 0.885, free 3.3;
    # at d = 1000 over 150 cycles: 0.157–0.162 against paired 1.03 (module docstring)
    rmse, free = _l96_twin(RECOMMENDED)
    paired, _ = _l96_twin(EnSFSettings(steps=100, eps_beta=1e-3, estimator="paired"))  # cached
    assert rmse < 0.25 and rmse < 0.5 * paired, (rmse, paired, free)


# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("estimator", ["paired", "mixture"])
def test_cpu_and_cuda_agree(device, estimator):
    g = torch.Generator().manual_seed(10)
    x0 = torch.randn(16, 300, generator=g, dtype=F64)
    y = torch.randn(300, generator=g, dtype=F64)

    def lik(x):
        return (y.to(x.device) - x) / 0.04

    s = EnSFSettings(steps=40, estimator=estimator, chunk=128)
    cpu = ensf_analysis(x0, lik, s, _gens(16))
    gpu = ensf_analysis(x0.to(device), lik, s, _gens(16))  # CPU generators: identical noise
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-9)
