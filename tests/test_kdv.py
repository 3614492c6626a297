"""Tests of the periodic KdV model (pseudo-spectral, ETDRK4): exact solitons and invariants."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from kernels.dynamics.kdv import KdV, etdrk4_coefficients, soliton

L = 40.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # These FFTs are tiny: intra-op threads only add contention on a shared 2-core machine.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _solitons(model: KdV, amps: list[list[float]], x0s: list[list[float]], t: float = 0.0,
              alpha: torch.Tensor | float = 6.0, delta: torch.Tensor | float = 1.0,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Sum of exact solitons per member, amps/x0s ``[B][S]`` → ``(B, n)`` float64."""
    x = model.state_coords()["x"]
    a = torch.tensor(amps, dtype=torch.float64)[..., None]
    p = torch.tensor(x0s, dtype=torch.float64)[..., None]
    if torch.is_tensor(alpha):
        alpha, delta = alpha[:, None, None], delta[:, None, None]
    return soliton(x, t, a, p, alpha, delta, length=model.length).sum(1).to(device)


def _theta(values: list[list[float]], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, device=device)


# ----------------------------------------------------------------------------------------------
# construction and metadata
@pytest.mark.parametrize("size", [15, 17, 8, 0, 64.5, True])
def test_rejects_bad_size(size: object) -> None:
    with pytest.raises(ValueError, match="even integer >= 16"):
        KdV(size)  # type: ignore[arg-type]


@pytest.mark.parametrize("length", [0.0, -1.0, math.inf, math.nan])
def test_rejects_bad_length(length: float) -> None:
    with pytest.raises(ValueError, match="length"):
        KdV(64, length=length)


def test_metadata() -> None:
    m = KdV()
    assert m.name == "kdv" and m.variables == ("u",)
    assert m.state_shape == (128,) and m.state_dims == ("x",)
    assert m.param_names == ("alpha", "delta")
    assert [p.truth for p in m.params] == [6.0, 1.0]
    assert all(p.transform == "log" for p in m.params)
    for p in m.params:  # prior centred on the truth in log space
        assert p.prior_loc == pytest.approx(math.log(p.truth)) and 0.2 <= p.prior_scale <= 0.3
    x = m.state_coords()["x"]
    torch.testing.assert_close(x, torch.arange(128, dtype=torch.float64) * (L / 128))
    assert m.ffts_per_step == 10 and KdV(dealias=False).ffts_per_step == 9
    assert m.default_dt == pytest.approx(0.005)
    assert KdV(256).default_dt == pytest.approx(0.0025)  # scales with dx


def test_step_checks_shapes(device: torch.device) -> None:
    m = KdV(32)
    x = torch.zeros(2, 32, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="theta"):
        m.step(x, _theta([[6.0, 1.0]], device))
    with pytest.raises(ValueError, match="state"):
        m.step(x[:, :16], m.truth_theta(2, dtype=torch.float64, device=device))


# ----------------------------------------------------------------------------------------------
# ETDRK4 coefficients
def test_contour_coefficients_match_closed_forms() -> None:
    h = 0.01
    # At hL = 0 the φ-functions take their limits Q = h/2, f1 = f2 = f3 = h/6.
    e, e2, q, f1, f2, f3 = etdrk4_coefficients(torch.zeros(1, dtype=torch.complex128), h)
    torch.testing.assert_close(torch.stack([e, e2]).real, torch.ones(2, 1, dtype=torch.float64))
    for val, want in ((q, h / 2), (f1, h / 6), (f2, h / 6), (f3, h / 6)):
        assert abs(val.item() - want) < 1e-15
    # Away from 0 the closed forms (K&T eq. 2.5) are accurate; the contour must agree.
    z = 1j * torch.tensor([0.7, -3.0, 12.0, 250.0], dtype=torch.float64)
    _, _, q, f1, f2, f3 = etdrk4_coefficients(z, h)
    ez = torch.exp(z)
    closed = (
        h * (torch.exp(z / 2) - 1) / z,
        h * (-4 - z + ez * (4 - 3 * z + z**2)) / z**3,
        h * (2 + z + ez * (z - 2)) / z**3,
        h * (-4 - 3 * z - z**2 + ez * (4 - z)) / z**3,
    )
    for got, want in zip((q, f1, f2, f3), closed, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-16)


def test_coefficients_are_cached(device: torch.device) -> None:
    m = KdV(32)
    th = _theta([[6.0, 1.0], [5.0, 1.2]], device)
    c1 = m.coefficients(th, 0.01, torch.float64, device)
    assert m.coefficients(th.clone(), 0.01, torch.float64, device) is c1
    x = m.initial_state(2, torch.Generator().manual_seed(0), dtype=torch.float64, device=device)
    m.step(x, th, 0.01)
    assert m._cache is c1  # stepping with the same θ and dt reuses the set
    # A new α only rebuilds the nonlinear factor; the contour integrals (δ only) are kept.
    c2 = m.coefficients(th * torch.tensor([[2.0, 1.0]], device=device), 0.01, torch.float64, device)
    assert c2 is not c1 and c2.E is c1.E and c2.f3 is c1.f3
    assert not torch.equal(c2.g, c1.g)
    c3 = m.coefficients(th, 0.02, torch.float64, device)
    assert not torch.equal(c3.E, c2.E)
    c4 = m.coefficients(th, 0.02, torch.float32, device)
    assert c4.E.dtype == torch.complex64 and c4.g.dtype == torch.complex64


# ----------------------------------------------------------------------------------------------
# accuracy against exact solutions
def test_soliton_transit(device: torch.device) -> None:
    # α=6, δ=1, A=2: c = 4, κ = 1, so one transit of L = 40 takes t = 10; the periodic tails
    # 4·exp(−2κ·L/2) ≈ 2e-17 are negligible.
    m = KdV(256, length=L)
    th = _theta([[6.0, 1.0]], device)
    u0 = _solitons(m, [[2.0]], [[13.0]], device=device)
    dt = 0.0025
    u = m.advance(u0, th, round(10.0 / dt), dt)
    exact = _solitons(m, [[2.0]], [[13.0]], t=10.0, device=device)
    torch.testing.assert_close(exact, u0, rtol=0, atol=1e-14)  # one full transit
    assert (u - exact).abs().max().item() < 1e-4


def test_parameter_scaling(device: torch.device) -> None:
    # Per-member (α, δ, A): (3, 2, 2) → c = 2, κ = 0.5; (9, 0.75, 1) → c = 3, κ = 1.
    m = KdV(256, length=L)
    alpha = torch.tensor([3.0, 9.0], dtype=torch.float64)
    delta = torch.tensor([2.0, 0.75], dtype=torch.float64)
    th = torch.stack([alpha, delta], -1).to(device)
    amps, x0s, t, dt = [[2.0], [1.0]], [[20.0], [5.0]], 5.0, 0.0025
    u0 = _solitons(m, amps, x0s, alpha=alpha, delta=delta, device=device)
    u = m.advance(u0, th, round(t / dt), dt)
    exact = _solitons(m, amps, x0s, t=t, alpha=alpha, delta=delta, device=device)
    assert (u - exact).abs().max().item() < 1e-4
    # The same initial states at the truth θ end elsewhere: the per-member θ is really used.
    wrong = m.advance(u0, m.truth_theta(2, dtype=torch.float64, device=device), round(t / dt), dt)
    assert ((wrong - exact).abs().amax(-1) > 0.1).all()


def test_invariants_of_exact_soliton(device: torch.device) -> None:
    m = KdV(256, length=L)
    a, alpha, delta = 1.5, 4.0, 0.5
    kappa = math.sqrt(alpha * a / (12 * delta))
    u = soliton(m.state_coords()["x"].to(device), 0.0, a, 20.0, alpha, delta)[None]
    th = _theta([[alpha, delta]], device)
    assert m.mass(u).item() == pytest.approx(2 * a / kappa, rel=1e-12)
    assert m.momentum(u).item() == pytest.approx(4 * a**2 / (3 * kappa), rel=1e-12)
    h = delta / 2 * 16 * a**2 * kappa / 15 - alpha / 6 * 16 * a**3 / (15 * kappa)
    assert m.hamiltonian(u, th).item() == pytest.approx(h, rel=1e-10)


def test_conservation_two_solitons(device: torch.device) -> None:
    # Solitons of amplitude 1 and 0.5 (speeds 2 and 1) collide and separate during t ∈ [0, 5].
    m = KdV(128, length=L)
    th = _theta([[6.0, 1.0]], device)
    u0 = _solitons(m, [[1.0, 0.5]], [[10.0, 18.0]], device=device)
    u = m.rollout(u0, th, 1000, save_every=100)[0]  # (11, n), dt = 0.005
    mass, mom, ham = m.mass(u), m.momentum(u), m.hamiltonian(u, th.expand(len(u), -1))
    assert ((mass / mass[0] - 1).abs().max().item()) < 1e-12
    assert ((mom / mom[0] - 1).abs().max().item()) < 1e-6
    assert ((ham / ham[0] - 1).abs().max().item()) < 1e-5
    assert (u[5] - u0[0]).abs().max().item() > 0.1  # it did move


def test_conservation_random_initial_state(device: torch.device) -> None:
    # Random pairs up to amplitude 2 at the default dt: looser but still small drifts.
    m = KdV()
    x0 = m.initial_state(4, torch.Generator().manual_seed(3), dtype=torch.float64, device=device)
    th = m.truth_theta(4, dtype=torch.float64, device=device)
    u = m.advance(x0, th, 400)
    assert ((m.mass(u) / m.mass(x0) - 1).abs().max().item()) < 1e-12
    assert ((m.momentum(u) / m.momentum(x0) - 1).abs().max().item()) < 1e-4
    assert ((m.hamiltonian(u, th) / m.hamiltonian(x0, th) - 1).abs().max().item()) < 1e-3


def test_temporal_order_four(device: torch.device) -> None:
    m = KdV(128, length=L)
    th = _theta([[6.0, 1.0]], device)
    u0 = _solitons(m, [[1.0, 0.5]], [[10.0, 25.0]], device=device)
    t = 2.0
    ref = m.advance(u0, th, round(t / 0.00125), 0.00125)
    errs = [(m.advance(u0, th, round(t / dt), dt) - ref).abs().max().item()
            for dt in (0.02, 0.01, 0.005)]
    orders = [math.log2(a / b) for a, b in zip(errs[:-1], errs[1:], strict=True)]
    assert all(3.6 < p < 4.6 for p in orders), (errs, orders)


def test_dealias_option_close(device: torch.device) -> None:
    # A well-resolved field barely has modes above n/3: both variants agree closely.
    th = _theta([[6.0, 1.0]], device)
    runs = []
    for dealias in (True, False):
        m = KdV(128, dealias=dealias)
        runs.append(m.advance(_solitons(m, [[1.0]], [[20.0]], device=device), th, 200))
    assert 0 < (runs[0] - runs[1]).abs().max().item() < 1e-5


# ----------------------------------------------------------------------------------------------
# batching, initial states, dtypes
def test_batch_invariance(device: torch.device) -> None:
    m = KdV(64, length=20.0)
    gen = torch.Generator().manual_seed(7)
    x0 = m.initial_state(3, gen, dtype=torch.float64, device=device)
    th = m.sample_prior(3, gen, dtype=torch.float64, device=device)
    steps, dt = 60, 0.005
    batched = m.advance(x0, th, steps, dt)
    for i in range(3):
        alone = m.advance(x0[i : i + 1], th[i : i + 1], steps, dt)
        assert (alone - batched[i : i + 1]).abs().max().item() <= 1e-12
    # Members sharing a state but not θ diverge.
    shared = m.advance(x0[:1].expand(3, -1), th, steps, dt)
    assert (shared[1] - shared[0]).abs().max().item() > 1e-3
    assert (shared[2] - shared[0]).abs().max().item() > 1e-3


def test_initial_state(device: torch.device) -> None:
    m = KdV()
    x1 = m.initial_state(5, torch.Generator().manual_seed(1), dtype=torch.float64, device=device)
    x2 = m.initial_state(5, torch.Generator().manual_seed(1), dtype=torch.float64, device=device)
    assert x1.shape == (5, 128) and x1.dtype == torch.float64 and x1.device.type == device.type
    assert torch.equal(x1, x2)
    assert (x1 > 0).all() and (x1.amax(-1) >= 0.5).all() and (x1.amax(-1) <= 4.0 + 1e-12).all()
    # Mass of each soliton is 2A/κ = 4 sqrt(3 δ A / α) with A in [0.5, 2]; two per member.
    lo, hi = (2 * 4 * math.sqrt(3 * a / 6.0) for a in m.amplitude_range)
    mass = m.mass(x1)
    assert ((mass >= lo - 1e-9) & (mass <= hi + 1e-9)).all()
    x3 = m.initial_state(5, torch.Generator().manual_seed(2), dtype=torch.float32, device=device)
    assert x3.dtype == torch.float32 and not torch.allclose(x3.double(), x1)


def test_float32_tracks_float64(device: torch.device) -> None:
    m = KdV()
    x0 = m.initial_state(3, torch.Generator().manual_seed(5), dtype=torch.float64, device=device)
    th = m.sample_prior(3, torch.Generator().manual_seed(6), dtype=torch.float64, device=device)
    u64 = m.advance(x0, th, 200)
    u32 = m.advance(x0.float(), th.float(), 200)
    assert u32.dtype == torch.float32 and torch.isfinite(u32).all()
    assert (u32.double() - u64).abs().max().item() < 1e-4 * u64.abs().max().item()


@pytest.mark.gpu
def test_cpu_matches_cuda(device: torch.device) -> None:
    m_cpu, m_dev = KdV(256), KdV(256)
    gen = torch.Generator().manual_seed(11)
    x0 = m_cpu.initial_state(8, gen, dtype=torch.float64)
    th = m_cpu.sample_prior(8, gen, dtype=torch.float64)
    ref = m_cpu.advance(x0, th, 200)
    out = m_dev.advance(x0.to(device), th.to(device), 200)
    assert out.device.type == "cuda"
    assert (out.cpu() - ref).abs().max().item() < 1e-10
    out32 = m_dev.advance(x0.float().to(device), th.float().to(device), 200)
    assert torch.isfinite(out32).all()
    assert (out32.cpu().double() - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
