"""Tests of the FitzHugh–Nagumo ring (kernels/dynamics/fhn.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kernels.dynamics.fhn import FitzHughNagumo

F64 = torch.float64

# θ = (a, b, τ, I_ext) with a stable fixed point of the single neuron (no limit cycle).
STABLE_THETAS = [
    (0.7, 0.8, 12.5, 0.0),
    (0.7, 0.8, 12.5, 0.2),
    (0.9, 0.5, 5.0, 0.1),
    (0.5, 0.9, 3.0, -0.3),
]
# Oscillatory (truth) and a b > 1 case whose cubic has three real roots.
OTHER_THETAS = [(0.7, 0.8, 12.5, 0.5), (0.1, 2.0, 10.0, 0.0)]


def _theta(
    rows: list[tuple[float, ...]], device: torch.device, dtype: torch.dtype = F64
) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype, device=device)


def _mixed_theta(
    model: FitzHughNagumo, batch: int, device: torch.device, seed: int = 1
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return model.sample_prior(batch, g, dtype=F64, device=device)


def _uniform_ring(fp: torch.Tensor, n: int) -> torch.Tensor:
    """(B, 2) point -> (B, 2, n) state with every neuron at that point."""
    return fp[:, :, None].expand(-1, -1, n).clone()


# --------------------------------------------------------------------------------------------
# construction and metadata
def test_metadata() -> None:
    m = FitzHughNagumo(10, coupling=0.3)
    assert m.name == "fhn"
    assert m.variables == ("v", "w")
    assert m.state_shape == (2, 10)
    assert m.state_dims == ("variable", "neuron")
    coords = m.state_coords()
    assert torch.equal(coords["variable"], torch.arange(2))
    assert torch.equal(coords["neuron"], torch.arange(10))
    assert m.param_names == ("a", "b", "tau", "I_ext")
    assert [p.truth for p in m.params] == [0.7, 0.8, 12.5, 0.5]
    assert [p.transform for p in m.params] == ["log", "log", "log", "identity"]
    assert m.default_dt == 0.1
    # priors centred on the truth in the unconstrained space
    u_truth = m.to_unconstrained(m.truth_theta(1, dtype=F64))[0]
    assert torch.allclose(u_truth, torch.tensor([p.prior_loc for p in m.params], dtype=F64))
    assert FitzHughNagumo().state_shape == (2, 64)


@pytest.mark.parametrize("kwargs", [{"size": 2}, {"size": 0}, {"size": 3.0}, {"coupling": -0.1},
                                    {"coupling": math.inf}])
def test_invalid_construction(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="size|coupling"):
        FitzHughNagumo(**kwargs)


def test_shape_errors(device: torch.device) -> None:
    m = FitzHughNagumo(8)
    x = torch.zeros(3, 2, 8, dtype=F64, device=device)
    th = m.truth_theta(3, dtype=F64, device=device)
    with pytest.raises(ValueError, match="state"):
        m.step(torch.zeros(3, 2, 7, dtype=F64, device=device), th)
    with pytest.raises(ValueError, match="theta"):
        m.step(x, th[:2])
    with pytest.raises(ValueError, match="dx"):
        m.tendency_jvp(x, th, x[:, :, :4])


def test_initial_state(device: torch.device, dtype: torch.dtype) -> None:
    m = FitzHughNagumo(32)
    x = m.initial_state(50, torch.Generator().manual_seed(3), dtype=dtype, device=device)
    assert x.shape == (50, 2, 32) and x.dtype == dtype and x.device.type == device.type
    v, w = x[:, 0], x[:, 1]
    assert v.min() >= -2 and v.max() <= 2 and w.min() >= -0.5 and w.max() <= 1.5
    assert v.std() > 0.5  # really spread over the range
    # reproducible from the generator alone, identical across devices
    y = m.initial_state(50, torch.Generator().manual_seed(3), dtype=dtype)
    assert torch.equal(x.cpu(), y)


# --------------------------------------------------------------------------------------------
# fixed point
@pytest.mark.parametrize("coupling", [0.0, 0.25])
def test_fixed_point_zeroes_tendency(device: torch.device, coupling: float) -> None:
    m = FitzHughNagumo(8, coupling=coupling)
    th = _theta(STABLE_THETAS + OTHER_THETAS, device)
    fp = m.fixed_point(th)
    assert fp.shape == (len(th), 2) and fp.dtype == F64
    f = m.tendency(_uniform_ring(fp, 8), th)
    assert f.abs().max() < 1e-12


def test_fixed_point_matches_polynomial_roots(device: torch.device) -> None:
    m = FitzHughNagumo(4)
    th = _theta(STABLE_THETAS + OTHER_THETAS, device)
    fp = m.fixed_point(th).cpu().numpy()
    for (a, b, _tau, i_ext), (v, w) in zip(STABLE_THETAS + OTHER_THETAS, fp, strict=True):
        roots = np.roots([1.0, 0.0, 3.0 * (1.0 / b - 1.0), 3.0 * (a / b - i_ext)])
        real = roots[np.abs(roots.imag) < 1e-9].real
        assert v == pytest.approx(real.max(), abs=1e-12)  # the largest real root
        assert w == pytest.approx((v + a) / b, abs=1e-12)
    # the b > 1 case really has three real roots (the trigonometric branch was exercised)
    a, b, _, i_ext = OTHER_THETAS[1]
    roots = np.roots([1.0, 0.0, 3.0 * (1.0 / b - 1.0), 3.0 * (a / b - i_ext)])
    assert np.all(np.abs(roots.imag) < 1e-9)


def test_fixed_point_float32(device: torch.device) -> None:
    m = FitzHughNagumo(4)
    th64 = _theta(STABLE_THETAS + OTHER_THETAS, device)
    fp32 = m.fixed_point(th64.float())
    assert fp32.dtype == torch.float32
    assert torch.allclose(fp32.double(), m.fixed_point(th64), atol=1e-6)


def test_long_integration_converges_to_stable_fixed_point(device: torch.device) -> None:
    m = FitzHughNagumo(8, coupling=0.1)
    th = _theta(STABLE_THETAS, device)
    x0 = m.initial_state(len(th), torch.Generator().manual_seed(0), dtype=F64, device=device)
    x = m.advance(x0, th, 2000)  # 200 time units
    target = _uniform_ring(m.fixed_point(th), 8)
    assert (x - target).abs().max() < 1e-8


def test_truth_is_oscillatory(device: torch.device) -> None:
    # At the truth the fixed point is unstable: a neuron started next to it leaves it for the cycle.
    m = FitzHughNagumo(4, coupling=0.0)
    th = m.truth_theta(1, dtype=F64, device=device)
    x = _uniform_ring(m.fixed_point(th), 4) + 1e-6
    traj = m.rollout(m.advance(x, th, 2000), th, 1000)
    v = traj[0, :, 0, 0]
    assert v.max() > 1.5 and v.min() < -1.5


# --------------------------------------------------------------------------------------------
# tangent-linear model
@pytest.mark.parametrize("coupling", [0.0, 0.4])
def test_jvp_matches_central_differences(device: torch.device, coupling: float) -> None:
    m = FitzHughNagumo(12, coupling=coupling)
    g = torch.Generator().manual_seed(5)
    x = m.initial_state(6, g, dtype=F64, device=device)
    dx = torch.randn(6, 2, 12, generator=g, dtype=F64).to(device)
    th = _mixed_theta(m, 6, device)
    h = 1e-4
    fd = (m.tendency(x + h * dx, th) - m.tendency(x - h * dx, th)) / (2 * h)
    jvp = m.tendency_jvp(x, th, dx)
    # the tendency is cubic, so the central difference error is exactly h² |dv|³ / 3 per entry
    rel = (jvp - fd).norm() / jvp.norm()
    assert rel < 1e-7


def test_jvp_matches_autodiff(device: torch.device) -> None:
    m = FitzHughNagumo(12, coupling=0.2)
    g = torch.Generator().manual_seed(6)
    x = m.initial_state(4, g, dtype=F64, device=device)
    dx = torch.randn(4, 2, 12, generator=g, dtype=F64).to(device)
    th = _mixed_theta(m, 4, device)
    _, auto = torch.func.jvp(lambda y: m.tendency(y, th), (x,), (dx,))
    assert torch.allclose(m.tendency_jvp(x, th, dx), auto, rtol=1e-13, atol=1e-13)
    # and the full Jacobian of one member from reverse mode
    jac = torch.autograd.functional.jacobian(lambda y: m.tendency(y[None], th[:1])[0], x[0])
    expected = (jac.reshape(24, 24) @ dx[0].reshape(24)).reshape(2, 12)
    got = m.tendency_jvp(x[:1], th[:1], dx[:1])[0]
    assert torch.allclose(got, expected, rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------------------------
# time stepping
def test_rk4_is_fourth_order(device: torch.device) -> None:
    m = FitzHughNagumo(8, coupling=0.2)
    x0 = m.initial_state(3, torch.Generator().manual_seed(2), dtype=F64, device=device)
    th = _mixed_theta(m, 3, device)
    t_end = 4.0
    ref = m.advance(x0, th, 640, dt=t_end / 640)
    errs = [(m.advance(x0, th, k, dt=t_end / k) - ref).abs().max().item() for k in (20, 40, 80)]
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(3.6 < o < 4.4 for o in orders), (errs, orders)


def test_default_dt_is_accurate(device: torch.device) -> None:
    m = FitzHughNagumo(8, coupling=0.1)
    x0 = m.initial_state(2, torch.Generator().manual_seed(4), dtype=F64, device=device)
    th = m.truth_theta(2, dtype=F64, device=device)
    coarse = m.advance(x0, th, 500)  # 50 time units, several oscillation periods
    fine = m.advance(x0, th, 5000, dt=0.01)
    assert (coarse - fine).abs().max() < 1e-3


def test_float32_stable_over_1000_steps(device: torch.device) -> None:
    m = FitzHughNagumo(32, coupling=0.1)
    g = torch.Generator().manual_seed(7)
    th = m.sample_prior(8, g, dtype=torch.float32, device=device)
    x0 = m.initial_state(8, g, dtype=torch.float32, device=device)
    x = m.advance(x0, th, 1000)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert x[:, 0].abs().max() < 3.0 and x[:, 1].abs().max() < 3.0
    # agrees with float64 over a shorter horizon
    x32 = m.advance(x0, th, 100)
    x64 = m.advance(x0.double(), th.double(), 100)
    assert (x32.double() - x64).abs().max() < 1e-3


# --------------------------------------------------------------------------------------------
# coupling
def test_uniform_state_stays_uniform(device: torch.device) -> None:
    m = FitzHughNagumo(16, coupling=0.5)
    g = torch.Generator().manual_seed(8)
    x0 = _uniform_ring(m.initial_state(4, g, dtype=F64, device=device)[:, :, 0], 16)
    th = _mixed_theta(m, 4, device)
    x = m.advance(x0, th, 300)
    assert (x - x[:, :, :1]).abs().max() == 0
    # and follows the single-neuron dynamics: coupling contributes nothing
    single = FitzHughNagumo(16, coupling=0.0).advance(x0, th, 300)
    assert torch.allclose(x, single, rtol=0, atol=1e-12)


def test_uncoupled_neurons_are_independent(device: torch.device) -> None:
    n = 10
    g = torch.Generator().manual_seed(9)
    x0 = FitzHughNagumo(n).initial_state(2, g, dtype=F64, device=device)
    x1 = x0.clone()
    x1[:, :, 3] += 0.3  # perturb one neuron
    th = FitzHughNagumo(n).truth_theta(2, dtype=F64, device=device)
    others = [i for i in range(n) if i != 3]

    free = FitzHughNagumo(n, coupling=0.0)
    a, b = free.advance(x0, th, 200), free.advance(x1, th, 200)
    assert torch.equal(a[:, :, others], b[:, :, others])
    assert (a[:, :, 3] - b[:, :, 3]).abs().max() > 1e-3

    # with coupling the perturbation reaches the neighbours on both sides (ring wrap included)
    ring = FitzHughNagumo(n, coupling=0.2)
    a, b = ring.step(x0, th), ring.step(x1, th)
    changed = (a - b).abs().amax(dim=(0, 1)) > 0
    assert changed[2] and changed[4]
    x2 = x0.clone()
    x2[:, :, 0] += 0.3
    changed = (ring.step(x2, th) - a).abs().amax(dim=(0, 1)) > 0
    assert changed[n - 1] and changed[1]


def test_v_alone_cannot_separate_w_offset_from_i_ext_and_a(device: torch.device) -> None:
    # (w + δ, a + b δ, I_ext + δ) gives the same v for every δ: v observations leave θ a ridge
    # that only the prior closes (docs/benchmarks.md, FitzHugh–Nagumo smoothing). The smoother's
    # I_ext error follows its w offset along it; this guards that statement.
    m = FitzHughNagumo(16, coupling=0.1)
    g = torch.Generator().manual_seed(10)
    x0 = m.initial_state(3, g, dtype=F64, device=device)
    th = _mixed_theta(m, 3, device)
    delta = torch.tensor([0.3, -0.2, 0.1], dtype=F64, device=device)
    x1 = x0.clone()
    x1[:, 1] += delta[:, None]
    th1 = th.clone()
    th1[:, 0] += th[:, 1] * delta
    th1[:, 3] += delta
    ref, shifted = m.advance(x0, th, 400), m.advance(x1, th1, 400)
    assert torch.allclose(ref[:, 0], shifted[:, 0], rtol=0, atol=1e-9)
    assert torch.allclose(shifted[:, 1] - ref[:, 1], delta[:, None].expand(-1, 16), rtol=0, atol=1e-9)
    # b is not on the ridge: changing it alone changes v
    th2 = th.clone()
    th2[:, 1] *= 1.1
    assert (m.advance(x0, th2, 400)[:, 0] - ref[:, 0]).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------
# batching
def test_batch_invariance(device: torch.device) -> None:
    m = FitzHughNagumo(16, coupling=0.15)
    x0 = m.initial_state(5, torch.Generator().manual_seed(10), dtype=F64, device=device)
    th = _mixed_theta(m, 5, device)
    batched = m.advance(x0, th, 200)
    for i in (0, 3):
        alone = m.advance(x0[i:i + 1], th[i:i + 1], 200)
        assert (alone - batched[i:i + 1]).abs().max() <= 1e-12
        if device.type == "cpu":  # element-wise kernels: bitwise identical on the CPU
            assert torch.equal(alone, batched[i:i + 1])
    # the tangent-linear model is member-wise too
    dx = torch.ones_like(x0)
    one = m.tendency_jvp(x0[2:3], th[2:3], dx[2:3])
    assert (one - m.tendency_jvp(x0, th, dx)[2:3]).abs().max() <= 1e-12


@pytest.mark.parametrize("column", [0, 1, 2, 3])
def test_each_member_uses_its_own_theta(device: torch.device, column: int) -> None:
    m = FitzHughNagumo(8, coupling=0.1)
    x0 = m.initial_state(4, torch.Generator().manual_seed(11), dtype=F64, device=device)
    th = m.truth_theta(4, dtype=F64, device=device)
    base = m.advance(x0, th, 100)
    th2 = th.clone()
    th2[1, column] *= 1.3
    moved = m.advance(x0, th2, 100)
    assert (moved[1] - base[1]).abs().max() > 1e-4
    keep = [0, 2, 3]
    assert torch.equal(moved[keep], base[keep])


def test_theta_cast_to_state_dtype(device: torch.device) -> None:
    m = FitzHughNagumo(8)
    x0 = m.initial_state(2, torch.Generator().manual_seed(12), dtype=torch.float32, device=device)
    th = m.truth_theta(2, dtype=F64, device=device)
    assert m.step(x0, th).dtype == torch.float32


# --------------------------------------------------------------------------------------------
# devices
@pytest.mark.gpu
def test_cpu_and_cuda_agree(device: torch.device) -> None:
    m = FitzHughNagumo(64, coupling=0.1)
    g = torch.Generator().manual_seed(13)
    th = m.sample_prior(8, g, dtype=F64)
    x0 = m.initial_state(8, g, dtype=F64)
    cpu = m.advance(x0, th, 300)
    gpu = m.advance(x0.to(device), th.to(device), 300)
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, rtol=0, atol=1e-10)
    fp = m.fixed_point(th)
    assert torch.allclose(m.fixed_point(th.to(device)).cpu(), fp, rtol=0, atol=1e-12)
    x32 = m.advance(x0.float().to(device), th.float().to(device), 300)
    assert torch.isfinite(x32).all()
    assert (x32.double().cpu() - cpu).abs().max() < 1e-2
