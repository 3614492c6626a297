"""Tests of the 2-D Kolmogorov flow model (pseudo-spectral, dealiased, IFRK4)."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.dynamics.kolmogorov import Kolmogorov

F64 = torch.float64


def _grid(
    n: int, dtype: torch.dtype = F64, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Physical ``(y, x)`` mesh on ``[0, 2π)²``, each ``(n, n)``."""
    pos = torch.arange(n, dtype=dtype, device=device) * (2 * math.pi / n)
    y, x = torch.meshgrid(pos, pos, indexing="ij")
    return y, x


def _theta(
    nu: float | list[float],
    mu: float | list[float],
    device: torch.device | str,
    dtype: torch.dtype = F64,
) -> torch.Tensor:
    """θ ``(B, 2)`` from per-member viscosities and drags."""
    nu_t = torch.as_tensor(nu, dtype=dtype).reshape(-1)
    mu_t = torch.as_tensor(mu, dtype=dtype).reshape(-1)
    nu_t, mu_t = torch.broadcast_tensors(nu_t, mu_t)
    return torch.stack([nu_t, mu_t], dim=-1).to(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------------------------------------
# construction and metadata
def test_metadata() -> None:
    m = Kolmogorov(48)
    assert m.name == "kolmogorov"
    assert m.variables == ("vorticity",)
    assert m.state_shape == (48, 48)
    assert m.state_dims == ("y", "x")
    assert m.param_names == ("viscosity", "drag")
    assert m.param("viscosity").truth == 1e-3 and m.param("drag").truth == 0.1
    assert all(p.transform == "log" and p.lower > 0 for p in m.params)
    coords = m.state_coords()
    torch.testing.assert_close(coords["x"], torch.arange(48, dtype=F64) * (2 * math.pi / 48))
    torch.testing.assert_close(coords["y"], coords["x"])
    assert m.ffts_per_step == 18 and m.ffts_per_spectral_step == 16
    assert m.spectral_shape == (m.kc, 48) and m.kc == 16  # 3k < 48 <=> k <= 15
    assert m.stable_dt(2.0, cfl=0.5) == pytest.approx(0.5 * (2 * math.pi / 48) / 2.0)
    # log-normal priors centred on the truth
    th = m.sample_prior(4000, torch.Generator().manual_seed(0), dtype=F64)
    med = th.log().median(dim=0).values.exp()
    assert med[0].item() == pytest.approx(1e-3, rel=0.1)
    assert med[1].item() == pytest.approx(0.1, rel=0.1)


@pytest.mark.parametrize("size", [7, 6, 0, 65, 9])
def test_bad_size(size: int) -> None:
    with pytest.raises(ValueError, match="even integer >= 8"):
        Kolmogorov(size, forcing_amplitude=0.0)


def test_forcing_outside_band() -> None:
    with pytest.raises(ValueError, match="dealiased band"):
        Kolmogorov(8)  # k_f = 4 >= 8/3
    Kolmogorov(8, forcing_amplitude=0.0)
    Kolmogorov(8, forcing_wavenumber=2)


def test_shape_errors(device: torch.device) -> None:
    m = Kolmogorov(16)
    x = torch.zeros(2, 16, 16, dtype=F64, device=device)
    with pytest.raises(ValueError, match="state has shape"):
        bad = torch.zeros(2, 16, 8, dtype=F64, device=device)
        m.step(bad, m.truth_theta(2, dtype=F64, device=device))
    with pytest.raises(ValueError, match="theta has shape"):
        m.step(x, m.truth_theta(3, dtype=F64, device=device))


# ---------------------------------------------------------------------------------------------
# kinematics and helpers
def test_velocity_divergence_free_and_inverse(device: torch.device) -> None:
    m = Kolmogorov(32)
    omega = m.initial_state(3, torch.Generator().manual_seed(0), dtype=F64, device=device)
    u, v = m.velocity(omega)
    assert u.shape == v.shape == (3, 32, 32)
    kx = torch.arange(17, dtype=F64, device=device)
    ky = torch.fft.fftfreq(32, 1 / 32, dtype=F64, device=device)[:, None]
    u_hat, v_hat = torch.fft.rfft2(u), torch.fft.rfft2(v)
    div = 1j * kx * u_hat + 1j * ky * v_hat
    assert (div.abs().max() / u_hat.abs().max()).item() < 1e-13
    assert _rel(m.vorticity(u, v), omega) < 1e-12
    # ½ mean|u|² matches the requested unit RMS velocity
    torch.testing.assert_close(m.energy(omega), torch.full((3,), 0.5, dtype=F64, device=device))
    torch.testing.assert_close(m.enstrophy(omega), 0.5 * omega.square().mean(dim=(-2, -1)))


def test_sign_conventions(device: torch.device) -> None:
    m = Kolmogorov(32, forcing_wavenumber=3, forcing_amplitude=0.7)
    y, x = _grid(32, device=device)
    # shear u = sin(3y): ω = −∂u/∂y = −3 cos(3y), exactly the forcing shape of F = (A sin(k_f y), 0)
    u = torch.sin(3 * y)[None]
    v = torch.zeros_like(u)
    omega = m.vorticity(u, v)
    torch.testing.assert_close(omega, -3 * torch.cos(3 * y)[None], atol=1e-12, rtol=0)
    uu, vv = m.velocity(omega)
    torch.testing.assert_close(uu, u, atol=1e-12, rtol=0)
    torch.testing.assert_close(vv, v, atol=1e-12, rtol=0)
    torch.testing.assert_close(m.forcing(F64, device), 0.7 * omega[0], atol=1e-12, rtol=0)


def test_spectral_round_trip_and_band(device: torch.device) -> None:
    m = Kolmogorov(24, forcing_amplitude=0.0)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 24, 24, generator=g, dtype=F64).to(device)
    w = m.to_spectral(noise)
    assert w.shape == (2, m.kc, 24) and w.is_complex()
    ref = torch.fft.rfft2(noise)
    k = torch.fft.fftfreq(24, 1 / 24, dtype=F64).abs()
    band = (3 * k < 24).to(device)
    torch.testing.assert_close(w, (ref[..., : m.kc] * band[:, None]).transpose(-1, -2))
    # the projection is idempotent and to_physical inverts it on band-limited fields
    smooth = m.to_physical(w)
    torch.testing.assert_close(m.to_physical(m.to_spectral(smooth)), smooth, atol=1e-13, rtol=0)


def test_initial_state(device: torch.device) -> None:
    m = Kolmogorov(32)
    a = m.initial_state(4, torch.Generator().manual_seed(5), dtype=F64, device=device)
    b = m.initial_state(4, torch.Generator().manual_seed(5), dtype=torch.float32, device="cpu")
    assert a.shape == (4, 32, 32) and a.dtype == F64 and a.device.type == device.type
    torch.testing.assert_close(a.cpu().float(), b)  # same field on every device / dtype
    assert a.mean(dim=(-2, -1)).abs().max().item() < 1e-12
    assert not torch.allclose(a[0], a[1])
    spec = torch.fft.rfft2(a)
    k = torch.fft.fftfreq(32, 1 / 32, dtype=F64).abs()
    out = (3 * k[:, None] >= 32) | (3 * torch.arange(17, dtype=F64) >= 32)
    assert spec[..., out.to(device)].abs().max().item() < 1e-10 * spec.abs().max().item()
    torch.testing.assert_close(m.energy(a), torch.full((4,), 0.5, dtype=F64, device=device))


# ---------------------------------------------------------------------------------------------
# dynamics against exact solutions
@pytest.mark.parametrize("k", [1, 3])
def test_taylor_green_decay(device: torch.device, k: int) -> None:
    """TG vortex: the advection vanishes, so ω(t) = ω(0) exp(−(2νk² + μ)t) to rounding."""
    n = 32
    m = Kolmogorov(n, forcing_amplitude=0.0)
    y, x = _grid(n, device=device)
    omega0 = (2 * k * torch.cos(k * x) * torch.cos(k * y)).expand(2, n, n)
    theta = _theta([0.01, 0.02], [0.0, 0.3], device)
    dt, steps = 0.01, 150
    omega = m.advance(omega0, theta, steps, dt)
    t = dt * steps
    rate = 2 * theta[:, 0] * k**2 + theta[:, 1]
    expected = omega0 * torch.exp(-rate * t)[:, None, None]
    assert _rel(omega, expected) < 1e-6
    assert _rel(omega[1], expected[1]) < 1e-10  # the integrating factor is exact here


def test_laminar_kolmogorov_spin_up(device: torch.device) -> None:
    """From rest the forced shear flow is exact: ω = f (1 − e^{−λt}) / λ, λ = ν k_f² + μ."""
    m = Kolmogorov(16, forcing_wavenumber=2, forcing_amplitude=1.5)
    theta = _theta([1e-3, 0.05], [0.1, 0.02], device)
    dt, steps = 0.05, 100
    omega = m.advance(torch.zeros(2, 16, 16, dtype=F64, device=device), theta, steps, dt)
    lam = theta[:, 0] * 4 + theta[:, 1]
    expected = m.forcing(F64, device) * ((1 - torch.exp(-lam * dt * steps)) / lam)[:, None, None]
    assert _rel(omega, expected) < 1e-9


def test_inviscid_conservation(device: torch.device) -> None:
    """ν = μ = 0, unforced: the dealiased Galerkin system conserves energy and enstrophy."""
    m = Kolmogorov(32, forcing_amplitude=0.0)
    omega = m.initial_state(2, torch.Generator().manual_seed(2), dtype=F64, device=device)
    theta = torch.zeros(2, 2, dtype=F64, device=device)  # ν = 0 is accepted numerically
    e0, z0 = m.energy(omega), m.enstrophy(omega)
    out = m.advance(omega, theta, 100, dt=0.005)
    assert ((m.energy(out) - e0) / e0).abs().max().item() < 1e-8
    assert ((m.enstrophy(out) - z0) / z0).abs().max().item() < 1e-8
    assert (out - omega).abs().max().item() > 0.1  # the flow did evolve


def test_temporal_order_four(device: torch.device) -> None:
    m = Kolmogorov(32)
    x = m.initial_state(1, torch.Generator().manual_seed(3), dtype=F64, device=device)
    theta = m.truth_theta(1, {"viscosity": 0.02}, dtype=F64, device=device)
    T = 0.8

    def run(steps: int) -> torch.Tensor:
        w = m.to_spectral(x)
        for _ in range(steps):
            w = m.step_spectral(w, theta, T / steps)
        return m.to_physical(w)

    ref = run(320)
    errs = [(run(s) - ref).abs().max().item() for s in (20, 40, 80)]
    orders = [math.log2(a / b) for a, b in zip(errs, errs[1:], strict=False)]
    assert min(orders) > 3.5, (errs, orders)
    # step() and step_spectral() agree
    via_spectral = m.to_physical(m.step_spectral(m.to_spectral(x), theta, T / 20))
    torch.testing.assert_close(m.step(x, theta, T / 20), via_spectral)


# ---------------------------------------------------------------------------------------------
# batching and parameters
def test_batch_invariance(device: torch.device) -> None:
    m = Kolmogorov(32)
    x = m.initial_state(3, torch.Generator().manual_seed(4), dtype=F64, device=device)
    theta = _theta([1e-3, 5e-3, 2e-2], [0.1, 0.05, 0.3], device)
    batch = m.advance(x, theta, 10)
    for i in range(3):
        alone = m.advance(x[i : i + 1], theta[i : i + 1], 10)
        assert (alone[0] - batch[i]).abs().max().item() <= 1e-12


@pytest.mark.parametrize("n", [16, 32, 64])
def test_member_is_bitwise_independent_of_its_batch_on_the_cpu(n: int, one_thread) -> None:
    """What `scoreda generate --verify` relies on (a trajectory recomputed alone equals the
    stored one bit for bit): FFT passes along a strided axis group the lines of different
    members into SIMD blocks, so their rounding followed the batch (measured 1e-14 on an
    AVX-512 CPU before to_spectral's y pass ran along contiguous rows)."""
    m = Kolmogorov(n)
    g = torch.Generator().manual_seed(n)
    x = m.initial_state(9, g, dtype=F64)
    theta = m.sample_prior(9, g, dtype=F64)
    whole = m.advance(x, theta, 3)
    for size in (1, 2, 3, 5):
        parts = torch.cat([m.advance(x[i:i + size], theta[i:i + size], 3) for i in range(0, 9, size)])
        assert torch.equal(parts, whole), (size, (parts - whole).abs().max().item())


def test_per_member_theta(device: torch.device) -> None:
    m = Kolmogorov(32)
    x = m.initial_state(1, torch.Generator().manual_seed(6), dtype=F64, device=device)
    x = x.expand(2, -1, -1)
    out = m.advance(x, _theta([1e-3, 3e-2], [0.1, 0.1], device), 50, dt=0.02)
    assert _rel(out[0], out[1]) > 1e-2
    out = m.advance(x, _theta([1e-3, 1e-3], [0.1, 0.5], device), 50, dt=0.02)
    assert _rel(out[0], out[1]) > 1e-2
    # the step projects onto the dealiased band
    spec = torch.fft.rfft2(out)
    assert spec[..., m.kc :].abs().max().item() < 1e-10 * spec.abs().max().item()


def test_float32_forced_run(device: torch.device) -> None:
    m = Kolmogorov(64)
    x = m.initial_state(2, torch.Generator().manual_seed(7), device=device)
    theta = m.truth_theta(2, device=device)
    out = m.advance(x, theta, 200)
    assert out.dtype == torch.float32 and out.shape == (2, 64, 64)
    assert torch.isfinite(out).all()
    energy = m.energy(out)
    assert (energy > 0.05).all() and (energy < 20).all()
    # the mean vorticity stays zero (`mean_free`, which samplers rely on) under forcing and drag
    assert m.mean_free == (0,)
    assert float(out.double().mean(dim=(-2, -1)).abs().max()) < 1e-5 * float(out.double().std())
    # float32 tracks float64 for a short while
    ref = m.advance(x.double(), theta.double(), 10)
    assert _rel(m.advance(x, theta, 10).double(), ref) < 1e-4


@pytest.mark.gpu
def test_cpu_matches_cuda(device: torch.device) -> None:
    m = Kolmogorov(64)
    for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-4)):
        x = m.initial_state(3, torch.Generator().manual_seed(8), dtype=dtype)
        theta = _theta([1e-3, 5e-3, 1e-2], [0.1, 0.2, 0.05], "cpu", dtype=dtype)
        cpu = m.advance(x, theta, 20)
        gpu = m.advance(x.to(device), theta.to(device), 20)
        assert gpu.device.type == "cuda" and gpu.dtype == dtype
        assert _rel(gpu.cpu(), cpu) < tol


def test_unstable_flags_a_step_past_rk4s_limit_while_it_is_still_finite(device: torch.device) -> None:
    """The enstrophy bound ``rms ω₁ ≤ rms ω₀ + elapsed · rms f`` holds along a healthy run
    (a low-drag flow, every 0.1 for 20 time units) and is broken, with the state still finite,
    by the first interval where dt 0.2 outruns RK4 at 32²."""
    m = Kolmogorov(32)
    theta = _theta([7e-4, 1e-3, 2e-3], [0.035, 0.1, 0.3], device)
    x = m.initial_state(3, torch.Generator().manual_seed(3), dtype=F64, device=device)
    for _ in range(200):
        y = m.advance(x, theta, 5, 0.02)
        assert not m.unstable(x, y, 0.1).any()
        x = y
    x = m.initial_state(1, torch.Generator().manual_seed(3), dtype=F64, device=device)
    for _ in range(50):
        y = m.advance(x, theta[:1], 2, 0.2)
        if bool(m.unstable(x, y, 0.4)):
            break
        x = y
    else:
        pytest.fail("dt 0.2 at 32² was never flagged")
    assert torch.isfinite(y).all()
    # the same interval in ten steps of 0.04 is within the bound
    assert not m.unstable(x, m.advance(x, theta[:1], 10, 0.04), 0.4).any()
    # the bound itself: the forcing's share is allowed, a little more is not; NaN is flagged
    rms_f = 4 / math.sqrt(2)
    r0 = x.square().mean().sqrt()
    grown = x * ((r0 + 0.4 * rms_f) / r0) * 0.999
    assert not m.unstable(x, grown, 0.4).any()
    assert m.unstable(x, grown * 1.05, 0.4).all()
    nan = x.clone()
    nan[0, 3, 3] = float("nan")
    assert m.unstable(x, nan, 0.4).all()
