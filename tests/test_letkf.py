"""LETKF / ETKF / stochastic EnKF: closed forms, localization geometry, batching, a Lorenz-96 twin."""

from __future__ import annotations

import pytest
import torch

from kernels.dynamics.lorenz96 import Lorenz96
from kernels.letkf import (
    build_local_obs,
    enkf_stochastic,
    etkf_analysis,
    gaspari_cohn,
    letkf_analysis,
    periodic_distance,
)


def _linear_case(n: int, d: int, m: int, seed: int, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    mean = torch.randn(d, generator=g, dtype=f64)
    xf = mean + torch.randn(n, d, generator=g, dtype=f64) @ torch.randn(d, d, generator=g, dtype=f64) / d**0.5
    h = torch.randn(m, d, generator=g, dtype=torch.float64) / d**0.5
    y = torch.randn(m, generator=g, dtype=torch.float64)
    std = 0.5 + torch.rand(m, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (xf, h, y, std)]


def _kalman(xf: torch.Tensor, h: torch.Tensor, y: torch.Tensor, std: torch.Tensor, infl: float = 1.0):
    """Kalman mean/covariance update with the (inflated) ensemble covariance as the prior."""
    mean = xf.mean(0)
    a = (xf - mean) * infl
    p = a.T @ a / (xf.shape[0] - 1)
    s = h @ p @ h.T + torch.diag(std**2)
    k = p @ h.T @ torch.linalg.inv(s)
    return mean + k @ (y - h @ mean), p - k @ h @ p


def _ring(d: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    return torch.arange(d, dtype=dtype, device=device)[:, None]


def _torus(nx: int, ny: int) -> torch.Tensor:
    gx, gy = torch.meshgrid(torch.arange(nx), torch.arange(ny), indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], -1).double()


# ------------------------------------------------------------------------------------------------
def test_gaspari_cohn_known_values():
    r = torch.tensor([0.0, 1.0, 2.0, 2.5, -0.5, 1e3], dtype=torch.float64)
    w = gaspari_cohn(r)
    half = float(gaspari_cohn(torch.tensor(0.5, dtype=torch.float64)))  # symmetric in r
    torch.testing.assert_close(w, torch.tensor([1.0, 5 / 24, 0.0, 0.0, half, 0.0], dtype=torch.float64))
    torch.testing.assert_close(half, 1 - 5 / 12 + 5 / 64 + 1 / 32 - 1 / 128)
    # continuous at r = 1 and r = 2, monotone decreasing in between
    eps = 1e-9
    x = torch.tensor([1 - eps, 1 + eps, 2 - eps], dtype=torch.float64)
    wx = gaspari_cohn(x)
    assert abs(wx[0] - wx[1]) < 1e-8 and wx[2] < 1e-8
    grid = torch.linspace(0, 2, 401, dtype=torch.float64)
    assert (gaspari_cohn(grid).diff() <= 1e-15).all()
    # the DAPPER calibration: c ≈ 1.82 × "radius" puts the weight near e^{-1/2} at that radius
    assert abs(gaspari_cohn(torch.tensor(1 / 1.82)).item() - 0.6) < 0.05


def test_periodic_distance_ring_and_torus():
    ext = torch.tensor([10.0])
    a = torch.tensor([[0.0], [1.0], [9.5]])
    b = torch.tensor([[9.0], [6.0], [0.5]])
    torch.testing.assert_close(periodic_distance(a, b, ext), torch.tensor([1.0, 5.0, 1.0]))
    ext2 = torch.tensor([8.0, 6.0])
    p = torch.tensor([[0.0, 0.0], [7.0, 5.0], [4.0, 3.0]])
    q = torch.tensor([[7.0, 5.0], [1.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(periodic_distance(p, q, ext2), torch.tensor([2**0.5, 8**0.5, 5.0]))
    # broadcasting (G, 1, k) against (m, k)
    assert periodic_distance(p[:, None, :], q, ext2).shape == (3, 3)


def test_local_obs_matches_brute_force_on_torus():
    # cell-binned search must find exactly the observations a dense distance table finds
    g = torch.Generator().manual_seed(0)
    nx, ny = 23, 17
    grid = _torus(nx, ny)
    obs = torch.rand(150, 2, generator=g, dtype=torch.float64) * torch.tensor([nx, ny], dtype=torch.float64)
    ext = torch.tensor([nx, ny], dtype=torch.float64)
    lo = build_local_obs(grid, obs, ext, radius=2.5, chunk=97)
    dense = gaspari_cohn(periodic_distance(grid[:, None], obs, ext) / 2.5)
    sparse = torch.zeros_like(dense).scatter_add_(1, lo.index, lo.weight)
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-14)
    assert lo.width == int((dense > 0).sum(1).max())


# ------------------------------------------------------------------------------------------------
def test_etkf_matches_kalman_update():
    xf, h, y, std = _linear_case(n=12, d=7, m=5, seed=1)
    for infl in (1.0, 1.1):
        xa = etkf_analysis(xf, xf @ h.T, y, std, inflation=infl)
        mean, cov = _kalman(xf, h, y, std, infl)
        torch.testing.assert_close(xa.mean(0), mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(torch.cov(xa.T), cov, rtol=1e-10, atol=1e-10)


def test_etkf_more_observations_than_members():
    xf, h, y, std = _linear_case(n=6, d=30, m=25, seed=2)
    xa = etkf_analysis(xf, xf @ h.T, y, std)
    mean, cov = _kalman(xf, h, y, std)
    torch.testing.assert_close(xa.mean(0), mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cov(xa.T), cov, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("radius", [None, 1e9])
def test_letkf_without_localization_equals_etkf(radius):
    d = 20
    xf, h, y, std = _linear_case(n=9, d=d, m=d, seed=3)
    hx = xf @ h.T + 0.1 * (xf @ h.T) ** 2  # a nonlinear operator: filters see only HXf
    loc = _ring(d)
    xa = letkf_analysis(xf, hx, y, std, loc, loc, (d,), radius=radius, inflation=1.05, chunk=7)
    torch.testing.assert_close(xa, etkf_analysis(xf, hx, y, std, inflation=1.05), rtol=1e-10, atol=1e-10)


def test_letkf_chunking_and_cached_local_obs(device, dtype):
    d, m = 50, 30
    xf, _, _, _ = _linear_case(n=10, d=d, m=m, seed=4, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(4)
    obs_loc = (torch.rand(m, 1, generator=g, dtype=torch.float64) * d).to(device, dtype)
    hx = xf[:, obs_loc[:, 0].long()]
    y = hx.mean(0) + torch.randn(m, generator=g, dtype=torch.float64).to(device, dtype)
    loc = _ring(d, dtype, device)
    args = (xf, hx, y, 0.7, loc, obs_loc, (d,))
    full = letkf_analysis(*args, radius=3.0, inflation=1.03, chunk=d)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for chunk in (1, 7, 16):
        torch.testing.assert_close(letkf_analysis(*args, radius=3.0, inflation=1.03, chunk=chunk), full,
                                   rtol=tol, atol=tol)
    cached = build_local_obs(loc, obs_loc, (d,), 3.0)
    out = letkf_analysis(xf, hx, y, 0.7, radius=3.0, inflation=1.03, chunk=11, local_obs=cached)
    torch.testing.assert_close(out, full, rtol=tol, atol=tol)
    assert out.dtype == dtype and out.device == xf.device


def test_letkf_member_permutation_equivariance():
    d = 24
    xf, h, y, std = _linear_case(n=8, d=d, m=d, seed=5)
    loc = _ring(d)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    xa = letkf_analysis(xf, xf @ h.T, y, std, loc, loc, (d,), radius=3.0, inflation=1.02)
    xp = letkf_analysis(xf[perm], (xf @ h.T)[perm], y, std, loc, loc, (d,), radius=3.0, inflation=1.02)
    torch.testing.assert_close(xp, xa[perm], rtol=1e-10, atol=1e-10)


def test_letkf_inflation_and_unobserved_points():
    d = 30
    xf, _, _, _ = _linear_case(n=10, d=d, m=d, seed=6)
    # points 0..9 observed; on the ring, points 14..25 lie outside every support (2c = 4)
    obs_idx = torch.arange(0, 10)
    loc = _ring(d)
    y = xf[:, obs_idx].mean(0) + 1.0
    kw = dict(grid_locations=loc, obs_locations=loc[obs_idx], extent=(d,), radius=2.0)
    xa1 = letkf_analysis(xf, xf[:, obs_idx], y, 1.0, inflation=1.0, **kw)
    xa2 = letkf_analysis(xf, xf[:, obs_idx], y, 1.0, inflation=1.3, **kw)
    far = slice(14, 26)
    torch.testing.assert_close(xa1[:, far], xf[:, far], rtol=1e-12, atol=1e-12)
    mean = xf[:, far].mean(0)
    torch.testing.assert_close(xa2[:, far], mean + 1.3 * (xf[:, far] - mean), rtol=1e-12, atol=1e-12)
    # at observed points inflation lends more weight to the observations: the mean moves further
    shift1 = (xa1[:, :10].mean(0) - xf[:, :10].mean(0)).mean()
    shift2 = (xa2[:, :10].mean(0) - xf[:, :10].mean(0)).mean()
    assert 0 < shift1 < shift2 < 1.0


def test_global_columns_learn_parameters_in_linear_case():
    # state x = θ·1 + noise on a ring, observed directly; θ (2 columns) has no location
    g = torch.Generator().manual_seed(7)
    n, d = 40, 32
    theta_true = torch.tensor([1.5, -0.5], dtype=torch.float64)
    basis = torch.stack([torch.ones(d), torch.cos(torch.arange(d) * 2 * torch.pi / d)]).double()
    theta = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x = theta @ basis + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)
    xf = torch.cat([x, theta], 1)
    y = theta_true @ basis + 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
    loc = _ring(d)
    prior_err = (theta.mean(0) - theta_true).abs()
    for cols in (2, torch.tensor([d, d + 1])):
        xa = letkf_analysis(xf, x, y, 0.1, loc, loc, (d,), radius=3.0, global_columns=cols)
        post_err = (xa[:, d:].mean(0) - theta_true).abs()
        assert (post_err < 0.1 * prior_err).all() and (post_err < 0.05).all(), (prior_err, post_err)
        assert (xa[:, d:].std(0) < 0.1).all()
        # the global columns equal an ETKF update of θ with all observations
        torch.testing.assert_close(xa[:, d:], etkf_analysis(theta, x, y, 0.1), rtol=1e-10, atol=1e-10)
    # a small rho damps the parameter update
    damped = letkf_analysis(xf, x, y, 0.1, loc, loc, (d,), radius=3.0, global_columns=2, global_rho=1e-4)
    assert ((damped[:, d:].mean(0) - theta_true).abs() > post_err).all()


def test_letkf_on_periodic_2d_grid(device):
    # a smooth field on a 16×12 torus, every 3rd point observed: errors shrink, spread shrinks,
    # and points near observations move more than points far away
    g = torch.Generator().manual_seed(8)
    nx, ny, n = 16, 12, 20
    grid = _torus(nx, ny)
    k = torch.randn(n, 4, generator=g, dtype=torch.float64)
    px, py = 2 * torch.pi * grid[:, 0] / nx, 2 * torch.pi * grid[:, 1] / ny
    modes = torch.stack([px.sin(), px.cos(), py.sin(), py.cos()])  # (4, nx·ny)

    def field(c):
        return c @ modes
    xf = field(k)
    truth = field(torch.randn(1, 4, generator=g, dtype=torch.float64))[0]
    obs_idx = torch.arange(0, nx * ny, 3)
    y = truth[obs_idx] + 0.1 * torch.randn(obs_idx.numel(), generator=g, dtype=torch.float64)
    xa = letkf_analysis(xf.to(device), xf[:, obs_idx].to(device), y.to(device), 0.1, grid.to(device),
                        grid[obs_idx].to(device), (nx, ny), radius=2.0, inflation=1.0, chunk=50).cpu()
    err_f = (xf.mean(0) - truth).square().mean().sqrt()
    err_a = (xa.mean(0) - truth).square().mean().sqrt()
    assert err_a < 0.3 * err_f
    assert xa.var(0).mean() < 0.2 * xf.var(0).mean()
    assert torch.isfinite(xa).all()


def test_stochastic_enkf_approaches_kalman():
    xf0, h, y, std = _linear_case(n=6, d=5, m=3, seed=9)
    # a large ensemble from a known Gaussian so the ensemble covariance is (almost) exact
    g = torch.Generator().manual_seed(10)
    n = 20000
    mean0 = xf0.mean(0)
    chol = torch.linalg.cholesky(torch.cov(xf0.T) + 0.1 * torch.eye(5, dtype=torch.float64))
    xf = mean0 + torch.randn(n, 5, generator=g, dtype=torch.float64) @ chol.T
    pert = torch.randn(n, 3, generator=g, dtype=torch.float64)
    xa = enkf_stochastic(xf, xf @ h.T, y, std, pert, inflation=1.0)
    mean, cov = _kalman(xf, h, y, std)
    torch.testing.assert_close(xa.mean(0), mean, rtol=0, atol=1e-10)  # centred perturbations: exact mean
    torch.testing.assert_close(torch.cov(xa.T), cov, rtol=0, atol=0.03 * cov.abs().max().item())
    # uncentred perturbations: mean exact only up to sampling noise
    xa2 = enkf_stochastic(xf, xf @ h.T, y, std, pert, center=False)
    torch.testing.assert_close(xa2.mean(0), mean, rtol=0, atol=0.05)


def test_stochastic_enkf_small_ensemble_mean_equals_kalman_with_centred_noise():
    xf, h, y, std = _linear_case(n=7, d=12, m=9, seed=11)
    pert = torch.randn(7, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xa = enkf_stochastic(xf, xf @ h.T, y, std, pert, inflation=1.05)
    mean, _ = _kalman(xf, h, y, std, 1.05)
    torch.testing.assert_close(xa.mean(0), mean, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------
def test_lorenz96_twin_letkf():
    """d=40, N=20, every variable observed with R=I every 0.05: LETKF keeps the RMSE well below 1."""
    d, n, cycles, burn = 40, 20, 200, 100
    model = Lorenz96(d)
    g = torch.Generator().manual_seed(0)
    th1 = model.truth_theta(1, dtype=torch.float64)
    thn = model.truth_theta(n, dtype=torch.float64)
    xt = model.advance(model.initial_state(1, g, dtype=torch.float64), th1, 500)
    ens = xt + torch.randn(n, d, generator=g, dtype=torch.float64)
    loc = _ring(d)
    local = build_local_obs(loc, loc, (d,), radius=6.0)
    errs = []
    for c in range(cycles):
        xt = model.step(xt, th1)
        ens = model.step(ens, thn)
        y = xt[0] + torch.randn(d, generator=g, dtype=torch.float64)
        ens = letkf_analysis(ens, ens, y, 1.0, inflation=1.03, local_obs=local)
        if c >= burn:
            errs.append((ens.mean(0) - xt[0]).square().mean().sqrt())
    assert torch.stack(errs).mean() <= 0.3
