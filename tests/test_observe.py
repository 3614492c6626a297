"""Observation operators: analytic likelihood scores, adjoints, layout, noise and validation."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.observe import (
    CoarsePool,
    CoarseVelocity,
    EveryKth,
    Identity,
    LinearOperator,
    Nonlinear,
    ObservationOperator,
    RandomMask,
    add_noise,
    check_observations,
    make_operator,
)

SHAPES = [(40,), (2, 16), (16, 16)]


def _operators(shape: tuple[int, ...]) -> list[ObservationOperator]:
    g = torch.Generator().manual_seed(7)
    ops: list[ObservationOperator] = [
        Identity(shape),
        EveryKth(shape, 4),
        EveryKth(shape, 3, offset=1),
        RandomMask(shape, count=5, generator=g),
        CoarsePool(shape, 4),
    ]
    if len(shape) == 2 and shape[0] == 2:  # FHN-like: observe only v
        ops += [EveryKth(shape, 2, channel=0), CoarsePool(shape, 2, channel=1), Identity(shape, channel=0)]
    if shape == (16, 16):  # a vorticity field: its pooled velocity
        ops += [CoarseVelocity(shape, 4), CoarseVelocity(shape, 1, domain=3.0)]
    return ops


def _all_operators(shape: tuple[int, ...]) -> list[ObservationOperator]:
    linear = _operators(shape)
    return linear + [Nonlinear(op, kind) for op in linear for kind in ("arctan", "saturation")]


def _case_id(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


@pytest.mark.parametrize("shape", SHAPES, ids=_case_id)
def test_grad_log_likelihood_matches_autograd(shape, device):
    g = torch.Generator().manual_seed(1)
    for op in _all_operators(shape):
        x = (2.0 * torch.randn(3, *shape, generator=g, dtype=torch.float64)).to(device)
        y = torch.randn(op.m, generator=g, dtype=torch.float64).to(device)
        sigma = (0.5 + torch.rand(op.m, generator=g, dtype=torch.float64)).to(device)
        for yy, ss in ((y, 0.7), (y.expand(3, -1).clone(), sigma)):
            xg = x.clone().requires_grad_(True)
            (ref,) = torch.autograd.grad(op.log_likelihood(xg, yy, ss).sum(), xg)
            got = op.grad_log_likelihood(x, yy, ss)
            assert got.shape == (3, *shape)
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10, msg=repr(op))


def test_autograd_fallback_in_base_class():
    class Square(ObservationOperator):
        @property
        def m(self) -> int:
            return 4

        def forward(self, x):
            return x[:, :4] ** 2

        def locations(self):
            return torch.arange(4, dtype=torch.float64)[:, None]

        def observed_mask(self):
            return torch.arange(6) < 4

    op = Square((6,))
    x = torch.randn(2, 6, dtype=torch.float64)
    y = torch.randn(4, dtype=torch.float64)
    expected = torch.zeros_like(x)
    expected[:, :4] = 2 * x[:, :4] * (y - x[:, :4] ** 2) / 0.25
    torch.testing.assert_close(op.grad_log_likelihood(x, y, 0.5), expected)
    torch.testing.assert_close(Nonlinear(op, "arctan").grad_log_likelihood(x, y, 0.5),
                               _autograd_score(Nonlinear(op, "arctan"), x, y, 0.5))


def _autograd_score(op, x, y, sigma):
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(op.log_likelihood(xg, y, sigma).sum(), xg)
    return g


@pytest.mark.parametrize("shape", SHAPES, ids=_case_id)
def test_adjoint_identity(shape, device):
    g = torch.Generator().manual_seed(2)
    for op in _operators(shape):
        assert op.linear
        x = torch.randn(4, *shape, generator=g, dtype=torch.float64).to(device)
        r = torch.randn(4, op.m, generator=g, dtype=torch.float64).to(device)
        lhs = (op(x) * r).sum(-1)
        rhs = (x * op.adjoint(r)).flatten(1).sum(-1)
        torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12, msg=repr(op))


def test_log_likelihood_value(dtype):
    op = EveryKth((10,), 5)
    x = torch.arange(20, dtype=dtype).reshape(2, 10)
    y = torch.tensor([1.0, 2.0], dtype=dtype)
    # member 0 observes (0, 5), member 1 observes (10, 15)
    expected = -0.5 * torch.tensor([(1**2 + 3**2) / 4, (9**2 + 13**2) / 4], dtype=dtype)
    torch.testing.assert_close(op.log_likelihood(x, y, 2.0), expected)
    assert not Nonlinear.arctan(op).linear and Nonlinear.saturation(op).kind == "saturation"


def test_every_kth_layout():
    op = EveryKth((40,), 4)
    assert op.m == 10 and op.spatial_shape == (40,)
    torch.testing.assert_close(op.locations()[:, 0], torch.arange(0, 40, 4, dtype=torch.float64))
    assert int(op.observed_mask().sum()) == 10

    grid = EveryKth((16, 16), 4, offset=1)
    assert grid.m == 16 and grid.spatial_shape == (16, 16)
    loc = grid.locations()
    assert loc.shape == (16, 2)
    assert set(loc[:, 0].tolist()) == {1.0, 5.0, 9.0, 13.0} == set(loc[:, 1].tolist())
    x = torch.arange(256.0).reshape(1, 16, 16)
    # observation j sits at (y, x) = loc[j]
    torch.testing.assert_close(grid(x)[0], (loc[:, 0] * 16 + loc[:, 1]).float())

    fhn = EveryKth((2, 16), 4, channel=0)
    assert fhn.m == 4 and fhn.spatial_shape == (16,) and fhn.locations().shape == (4, 1)
    mask = fhn.observed_mask()
    assert mask.shape == (2, 16) and int(mask[0].sum()) == 4 and not mask[1].any()
    both = EveryKth((2, 16), 4)
    assert both.m == 8 and int(both.observed_mask().sum()) == 8
    torch.testing.assert_close(both.locations()[:4], both.locations()[4:])


def test_coarse_velocity_of_a_known_streamfunction(device):
    # ψ = sin(2x) cos(3y) on [0, 2π)²: ω = −∇²ψ = 13ψ, u = ∂ψ/∂y, v = −∂ψ/∂x
    n = 32
    c = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    y, x = torch.meshgrid(c, c, indexing="ij")
    omega = (13 * torch.sin(2 * x) * torch.cos(3 * y)).to(device)[None]
    u = -3 * torch.sin(2 * x) * torch.sin(3 * y)
    v = -2 * torch.cos(2 * x) * torch.cos(3 * y)
    exact = CoarseVelocity((n, n), 1)
    assert exact.m == 2 * n * n
    torch.testing.assert_close(exact(omega)[0].cpu(), torch.cat([u.reshape(-1), v.reshape(-1)]))
    op = make_operator("coarse_velocity", (n, n), factor=8)
    assert op.linear and op.m == 2 * 16 and op.locations().shape == (32, 2)
    assert bool(op.observed_mask().all())
    pooled = CoarsePool((2, n, n), 8)(torch.stack([u, v])[None])
    torch.testing.assert_close(op(omega)[0].cpu(), pooled[0])
    with pytest.raises(ValueError, match="square vorticity"):
        CoarseVelocity((2, 16), 2)
    with pytest.raises(ValueError, match="needs option 'factor'"):
        make_operator("coarse_velocity", (16, 16))
    with pytest.raises(ValueError, match="does not divide"):
        make_operator("coarse_velocity", (16, 16), factor=3)


def test_coarse_pool_layout():
    op = CoarsePool((16, 16), 4)
    assert op.m == 16
    centres = torch.tensor([1.5, 5.5, 9.5, 13.5], dtype=torch.float64)
    loc = op.locations()
    torch.testing.assert_close(loc[:4, 0], torch.full((4,), 1.5, dtype=torch.float64))
    torch.testing.assert_close(loc[:4, 1], centres)
    assert bool(op.observed_mask().all())
    x = torch.zeros(1, 16, 16, dtype=torch.float64)
    x[0, 4:8, 0:4] = 2.0  # block (row 1, col 0) -> observation 4
    y = op(x)[0]
    assert y[4] == 2.0 and y.sum() == 2.0

    ring = CoarsePool((40,), 8)
    assert ring.m == 5
    torch.testing.assert_close(ring.locations()[:, 0], torch.arange(5, dtype=torch.float64) * 8 + 3.5)
    fhn = CoarsePool((2, 16), 4, channel=1)
    assert fhn.m == 4 and int(fhn.observed_mask()[1].sum()) == 16 and not fhn.observed_mask()[0].any()


def test_identity_and_nonlinear_values():
    x = torch.randn(3, 2, 8, dtype=torch.float64)
    op = Identity((2, 8))
    assert op.m == 16 and torch.equal(op(x), x.reshape(3, 16))
    assert torch.equal(Identity((2, 8), channel=0)(x), x[:, 0])
    torch.testing.assert_close(Nonlinear(op, "arctan")(x), torch.atan(x.reshape(3, 16)))
    torch.testing.assert_close(Nonlinear(op, "saturation")(x), (x / (1 + x.abs())).reshape(3, 16))
    torch.testing.assert_close(Nonlinear(op, "arctan").locations(), op.locations())


def test_random_mask_reproducible():
    a = RandomMask((16, 16), count=30, generator=torch.Generator().manual_seed(3))
    b = RandomMask((16, 16), count=30, generator=torch.Generator().manual_seed(3))
    c = RandomMask((16, 16), count=30, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.index, b.index) and not torch.equal(a.index, c.index)
    assert a.m == 30 and torch.unique(a.index).numel() == 30
    assert torch.equal(a.index, a.index.sort().values)
    assert int(a.observed_mask().sum()) == 30
    assert torch.unique(a.locations(), dim=0).shape == (30, 2)
    half = RandomMask((40,), fraction=0.25, generator=torch.Generator().manual_seed(0))
    assert half.m == 10
    seeded = make_operator("random_mask", (40,), count=7, seed=11)
    again = make_operator("random_mask", (40,), count=7, seed=11)
    assert torch.equal(seeded.index, again.index)


def test_add_noise_statistics_and_reproducibility():
    y = torch.zeros(200, 100, dtype=torch.float32)
    sigma = torch.linspace(0.5, 2.0, 100)
    noisy = add_noise(y, sigma, torch.Generator().manual_seed(5))
    assert noisy.dtype == torch.float32
    torch.testing.assert_close(noisy.std(0), sigma, rtol=0.2, atol=0.0)
    assert abs(float(add_noise(y, 0.3, torch.Generator().manual_seed(5)).std()) - 0.3) < 0.01
    again = add_noise(y, sigma, torch.Generator().manual_seed(5))
    assert torch.equal(noisy, again)
    # drawn on the CPU in float64, then cast
    eps = torch.randn(200, 100, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(noisy, (sigma.double() * eps).float())


@pytest.mark.parametrize(
    ("y", "m", "sigma", "message"),
    [
        (torch.tensor([1.0, float("nan"), 0.0]), 3, 1.0, "NaN or inf"),
        (torch.tensor([1.0, float("inf"), 0.0]), 3, 1.0, "NaN or inf"),
        (torch.zeros(4), 3, 1.0, r"shape \(4,\); expected \(3,\)"),
        (torch.zeros(2, 2, 3), 3, 1.0, "expected"),
        (torch.zeros(3), 3, 0.0, "sigma must be positive"),
        (torch.zeros(3), 3, -1.0, "sigma must be positive"),
        (torch.zeros(3), 3, float("nan"), "sigma must be finite"),
        (torch.zeros(3), 3, torch.tensor([1.0, 0.0, 1.0]), "sigma must be positive"),
        (torch.zeros(3), 3, torch.tensor([1.0, float("inf"), 1.0]), "sigma contains NaN or inf"),
        (torch.zeros(3), 3, torch.ones(4), r"sigma has shape \(4,\)"),
    ],
)
def test_check_observations_rejects(y, m, sigma, message):
    with pytest.raises(ValueError, match=message):
        check_observations(y, m, sigma)


def test_check_observations_accepts():
    check_observations(torch.zeros(5, 3), 3, torch.ones(3))
    check_observations(torch.zeros(3, dtype=torch.float64), 3, 0.1)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="factor=3 does not divide"):
        CoarsePool((16, 16), 3)
    with pytest.raises(ValueError, match="factor=3 does not divide"):
        make_operator("coarse_pool", (40,), factor=3)
    with pytest.raises(ValueError, match="unknown observation operator kind 'sparse'"):
        make_operator("sparse", (40,))
    with pytest.raises(ValueError, match="unknown option 'stride' for observation operator 'every_kth'"):
        make_operator("every_kth", (40,), stride=2)
    with pytest.raises(ValueError, match="needs option 'k'"):
        make_operator("every_kth", (40,))
    with pytest.raises(ValueError, match="option 'nonlinearity'"):
        make_operator("identity", (40,), nonlinearity="tanh")
    with pytest.raises(ValueError, match="exactly one of count or fraction"):
        make_operator("random_mask", (40,), count=3, fraction=0.5)
    with pytest.raises(ValueError, match="count must be"):
        RandomMask((40,), count=41)
    with pytest.raises(ValueError, match="k must be a positive int"):
        EveryKth((40,), 0)
    with pytest.raises(ValueError, match="channel=2 is out of range"):
        EveryKth((2, 16), 2, channel=2)
    with pytest.raises(ValueError, match="no channel axis"):
        Identity((40,), channel=0)
    op = EveryKth((40,), 4)
    with pytest.raises(ValueError, match=r"state has shape \(2, 41\); expected \(B, 40\)"):
        op(torch.zeros(2, 41))
    with pytest.raises(ValueError, match=r"observations y have shape \(9,\)"):
        op.log_likelihood(torch.zeros(2, 40), torch.zeros(9), 1.0)
    with pytest.raises(ValueError, match="sigma must be positive"):
        op.grad_log_likelihood(torch.zeros(2, 40), torch.zeros(10), 0.0)


def test_make_operator_kinds():
    shape = (2, 16)
    assert isinstance(make_operator("identity", shape), Identity)
    op = make_operator("every_kth", shape, k=4, channel=0, nonlinearity="arctan")
    assert isinstance(op, Nonlinear) and op.kind == "arctan" and op.m == 4
    assert isinstance(make_operator("coarse_pool", (16, 16), factor=4, nonlinearity=None), CoarsePool)
    assert make_operator("random_mask", shape, fraction=0.5, seed=1, nonlinearity="saturation").m == 16
    assert make_operator("identity", (4, 4), spatial_ndim=1).spatial_shape == (4,)


@pytest.mark.parametrize("shape", SHAPES, ids=_case_id)
def test_member_independent_of_batch(shape, dtype, device):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(7, *shape, generator=g, dtype=dtype).to(device)
    for op in _all_operators(shape):
        y = torch.randn(7, op.m, generator=g, dtype=dtype).to(device)
        full = (op(x), op.log_likelihood(x, y, 0.3), op.grad_log_likelihood(x, y, 0.3))
        for i in (0, 4):
            alone = (op(x[i : i + 1]), op.log_likelihood(x[i : i + 1], y[i : i + 1], 0.3),
                     op.grad_log_likelihood(x[i : i + 1], y[i : i + 1], 0.3))
            for a, b in zip(alone, full, strict=True):
                if "CoarseVelocity" in repr(op):  # batched FFTs may round the last bit apart
                    torch.testing.assert_close(a[0], b[i], msg=repr(op))
                else:
                    assert torch.equal(a[0], b[i]), repr(op)


def test_float32_and_autograd_through_operator():
    op = make_operator("coarse_pool", (16, 16), factor=4, nonlinearity="saturation")
    x = torch.randn(2, 16, 16, requires_grad=True)
    y = torch.zeros(op.m)
    ll = op.log_likelihood(x, y, torch.full((op.m,), 0.5))
    assert ll.dtype == torch.float32 and ll.shape == (2,)
    ll.sum().backward()
    assert x.grad is not None and math.isfinite(float(x.grad.abs().sum()))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=_case_id)
def test_cpu_matches_cuda(shape, device):
    g = torch.Generator().manual_seed(12)
    for op in _all_operators(shape):
        x = torch.randn(3, *shape, generator=g, dtype=torch.float64)
        y_clean = op(x)
        y = add_noise(y_clean, 0.2, torch.Generator().manual_seed(1))
        y_dev = add_noise(y_clean.to(device), 0.2, torch.Generator().manual_seed(1))
        torch.testing.assert_close(y_dev.cpu(), y, rtol=0, atol=0)
        torch.testing.assert_close(op(x.to(device)).cpu(), y_clean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(op.log_likelihood(x.to(device), y_dev, 0.2).cpu(),
                                   op.log_likelihood(x, y, 0.2), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(op.grad_log_likelihood(x.to(device), y_dev, 0.2).cpu(),
                                   op.grad_log_likelihood(x, y, 0.2), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="CPU generator"):
        add_noise(torch.zeros(3, device=device), 1.0, torch.Generator(device=device))


class _Dense(LinearOperator):
    """``H x = M x.flatten(1)`` for a dense ``M``: the generic paths of the base classes."""

    def __init__(self, shape, mat):
        super().__init__(shape)
        self.mat = mat

    @property
    def m(self) -> int:
        return self.mat.shape[0]

    def forward(self, x):
        return x.reshape(x.shape[0], -1) @ self.mat.T.to(x)

    def adjoint(self, r):
        return (r @ self.mat.to(r)).reshape(r.shape[0], *self.state_shape)

    def locations(self):
        return torch.zeros(self.m, 1, dtype=torch.float64)

    def observed_mask(self):
        return torch.ones(self.state_shape, dtype=torch.bool)


@pytest.mark.parametrize("shape", SHAPES, ids=_case_id)
def test_white_covariance_is_h_v_ht(shape):
    """``white_covariance(v) = J V Jᵀ`` (J the Jacobian at 0, V per-channel variances on the
    diagonal), ``white_variance`` its diagonal, and ``disjoint_rows`` exactly when it is diagonal
    (a pooled velocity is not: its rows overlap everywhere)."""
    n_ch = shape[0] if len(shape) == 2 and shape[0] == 2 else 1
    var = torch.tensor([3.0, 0.5], dtype=torch.float64)[:n_ch]
    w = var.repeat_interleave(math.prod(shape) // n_ch)
    g = torch.Generator().manual_seed(4)
    dense = _Dense(shape, torch.randn(3, math.prod(shape), generator=g, dtype=torch.float64))
    for op in _all_operators(shape) + [dense]:
        jac = torch.autograd.functional.jacobian(
            op.forward, torch.zeros(1, *shape, dtype=torch.float64)).reshape(op.m, -1)
        ref = (jac * w) @ jac.T
        cov = op.white_covariance(var if n_ch > 1 else float(var))
        torch.testing.assert_close(cov, ref, rtol=1e-12, atol=1e-14, msg=repr(op))
        torch.testing.assert_close(op.white_variance(var), ref.diagonal(), rtol=1e-12, atol=1e-14,
                                   msg=repr(op))
        off = (ref - torch.diag(ref.diagonal())).abs().max()
        assert op.disjoint_rows == bool(off == 0), repr(op)
    assert not CoarseVelocity((16, 16), 4).disjoint_rows


def test_white_variance_refuses_bad_channel_variances():
    op = EveryKth((2, 16), 2)
    for bad in (torch.ones(3), torch.tensor([1.0, -1.0]), torch.tensor([1.0, math.nan])):
        with pytest.raises(ValueError, match="channel_var"):
            op.white_variance(bad)
