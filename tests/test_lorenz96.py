"""Lorenz-96: energy identity, RK4 order, per-member forcing, tangent-linear model."""

from __future__ import annotations

import pytest
import torch

from kernels.dynamics.lorenz96 import Lorenz96


def test_nonlinear_term_conserves_energy(device):
    m = Lorenz96(37)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 37, generator=g, dtype=torch.float64).to(device)
    theta = torch.zeros(5, 1, dtype=torch.float64, device=device)
    nonlinear = m.tendency(x, theta) + x  # remove the damping; F = 0
    # sum_i x_i (x_{i+1} - x_{i-2}) x_{i-1} telescopes to zero on the ring
    energy_rate = (x * nonlinear).sum(-1)
    assert energy_rate.abs().max() < 1e-12 * (x**3).abs().sum(-1).max()
    # full energy budget: dE/dt = -|x|^2 + F sum(x)
    theta = torch.full((5, 1), 8.0, dtype=torch.float64, device=device)
    rate = (x * m.tendency(x, theta)).sum(-1)
    torch.testing.assert_close(rate, -(x * x).sum(-1) + 8.0 * x.sum(-1))


def test_rk4_fourth_order(device):
    m = Lorenz96(40)
    g = torch.Generator().manual_seed(2)
    x0 = m.initial_state(2, g, dtype=torch.float64, device=device)
    theta = m.truth_theta(2, dtype=torch.float64, device=device)
    T = 0.4
    ref = m.advance(x0, theta, 400, dt=T / 400)
    errs = []
    for n in (10, 20, 40):
        errs.append(float((m.advance(x0, theta, n, dt=T / n) - ref).norm()))
    orders = [torch.log2(torch.tensor(errs[i] / errs[i + 1])).item() for i in range(2)]
    assert all(3.7 < o < 4.4 for o in orders), orders


def test_per_member_forcing_is_used(device):
    m = Lorenz96(16)
    x = torch.full((3, 16), 2.0, dtype=torch.float64, device=device)
    theta = torch.tensor([[8.0], [2.0], [-1.0]], dtype=torch.float64, device=device)
    # a uniform state has zero advection: dx/dt = F - x, exactly integrable
    y = m.advance(x, theta, 10, dt=0.01)
    exact = theta + (x - theta) * torch.exp(torch.tensor(-0.1, dtype=torch.float64))
    torch.testing.assert_close(y, exact.expand_as(y), rtol=1e-10, atol=1e-10)


def test_tangent_linear_matches_finite_differences(device):
    m = Lorenz96(24)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 24, generator=g, dtype=torch.float64).to(device)
    dx = torch.randn(4, 24, generator=g, dtype=torch.float64).to(device)
    theta = m.truth_theta(4, dtype=torch.float64, device=device)
    eps = 1e-6
    fd = (m.tendency(x + eps * dx, theta) - m.tendency(x - eps * dx, theta)) / (2 * eps)
    torch.testing.assert_close(m.tendency_jvp(x, dx), fd, rtol=1e-7, atol=1e-7)


def test_chaotic_attractor_statistics():
    # long-run mean and std at F=8 are about 2.3 and 3.6 (Lorenz 1996; widely reproduced)
    m = Lorenz96(40)
    x = m.initial_state(4, torch.Generator().manual_seed(0), dtype=torch.float64)
    theta = m.truth_theta(4, dtype=torch.float64)
    x = m.advance(x, theta, 500)
    traj = m.rollout(x, theta, 2000, save_every=5)
    assert 2.0 < float(traj.mean()) < 2.7
    assert 3.3 < float(traj.std()) < 3.9


def test_bad_shapes_are_reported():
    m = Lorenz96(8)
    with pytest.raises(ValueError, match="state has shape"):
        m.step(torch.zeros(2, 9), m.truth_theta(2))
    with pytest.raises(ValueError, match="theta has shape"):
        m.step(torch.zeros(2, 8), m.truth_theta(3))
    with pytest.raises(ValueError, match=">= 4"):
        Lorenz96(3)


@pytest.mark.parametrize("d,tile", [(40, 16), (1000, 300), (257, 64), (16, 25_000)])
def test_tiled_step_equals_rolled_step(d, tile):
    from kernels.dynamics.lorenz96 import l96_rk4_step, l96_rk4_step_tiled

    x = torch.randn(3, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d)) + 8
    forcing = torch.tensor([[8.0], [6.0], [10.0]], dtype=torch.float64)
    torch.testing.assert_close(l96_rk4_step_tiled(x, forcing, 0.05, tile),
                               l96_rk4_step(x, forcing, 0.05), rtol=1e-14, atol=1e-13)


@pytest.mark.slow
def test_compiled_step_matches_eager():
    x = torch.randn(3, 4096, dtype=torch.float32, generator=torch.Generator().manual_seed(0)) + 8
    theta = torch.tensor([[8.0], [6.0], [10.0]])
    eager = Lorenz96(4096).step(x, theta)
    compiled = Lorenz96(4096, compile=True).step(x, theta)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
