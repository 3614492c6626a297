"""Contract checks that every registered model must pass."""

from __future__ import annotations

import pytest
import torch

from kernels.dynamics import MODEL_NAMES, get_model
from kernels.streams import generator, per_member, stream_seed

SMALL = {"lorenz96": 16, "fhn": 8, "kolmogorov": 16, "kdv": 32}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_member_alone_equals_member_in_mixed_batch(name, device):
    m = get_model(name, SMALL[name])
    B = 4
    x = m.initial_state(B, torch.Generator().manual_seed(0), dtype=torch.float64, device=device)
    theta = m.sample_prior(B, torch.Generator().manual_seed(1), dtype=torch.float64, device=device)
    batch = m.advance(x, theta, 5)
    for i in range(B):
        alone = m.advance(x[i:i + 1], theta[i:i + 1], 5)
        torch.testing.assert_close(alone, batch[i:i + 1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_params_transforms_and_prior(name):
    m = get_model(name, SMALL[name])
    th = m.sample_prior(256, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert th.shape == (256, len(m.params))
    torch.testing.assert_close(m.from_unconstrained(m.to_unconstrained(th)), th)
    sub = list(range(len(m.params)))[::-2]  # a subset, out of order: columns follow ``index``
    torch.testing.assert_close(m.to_unconstrained(th[:, sub], sub), m.to_unconstrained(th)[:, sub])
    torch.testing.assert_close(m.from_unconstrained(m.to_unconstrained(th[:, sub], sub), sub), th[:, sub])
    for j, p in enumerate(m.params):
        assert p.lower < p.truth < p.upper
        if p.transform == "log":
            assert bool((th[:, j] > 0).all())
        u = m.to_unconstrained(th)[:, j]
        assert abs(float(u.mean()) - p.prior_loc) < 4 * p.prior_scale / 16 + 1e-12
    assert m.truth_theta(2).shape == (2, len(m.params))
    with pytest.raises(KeyError):
        m.truth_theta(1, {"nonexistent": 1.0})


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_preserved_and_rollout_shape(name, dtype):
    m = get_model(name, SMALL[name])
    x = m.initial_state(2, torch.Generator().manual_seed(0), dtype=dtype)
    traj = m.rollout(x, m.truth_theta(2, dtype=dtype), 6, save_every=3)
    assert traj.shape == (2, 3, *m.state_shape) and traj.dtype == dtype
    assert bool(torch.isfinite(traj).all())
    with pytest.raises(ValueError):
        m.rollout(x, m.truth_theta(2, dtype=dtype), 5, save_every=2)


def test_streams_are_keyed_and_independent():
    assert stream_seed(1, "init", 3) == stream_seed(1, "init", 3)
    assert len({stream_seed(1, "init", i) for i in range(1000)}) == 1000
    assert stream_seed(1, "init", 3) != stream_seed(2, "init", 3)
    assert stream_seed(1, 0, 3) != stream_seed(1, 3, 0)
    a = per_member(lambda g: torch.randn(3, generator=g), 7, range(6), "x")
    b = per_member(lambda g: torch.randn(3, generator=g), 7, [4, 5], "x")
    torch.testing.assert_close(a[4:], b)  # a member's numbers do not depend on its batch
    g = generator(7, "x", 4)
    torch.testing.assert_close(torch.randn(3, generator=g), a[4])


def test_base_unstable_flags_only_non_finite_rows():
    """Models without a growth bound (Lorenz-96, FHN, KdV) flag non-finite rows only."""
    m = get_model("lorenz96", 8)
    x = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    after = x * 100.0
    after[1, 2] = float("inf")
    after[2, 0] = float("nan")
    assert m.unstable(x, after, 0.1).tolist() == [False, True, True]


def test_advance_refined_halves_the_step_of_failing_rows_only():
    """A row that fails is redone from its start at half the step, as often as it needs; the
    others keep the plain step's numbers, and a row's result does not depend on its batch."""
    m = get_model("kolmogorov", 16)
    th1 = m.truth_theta(1, {}, dtype=torch.float64)
    x = m.advance(m.initial_state(1, torch.Generator().manual_seed(0), dtype=torch.float64), th1,
                  100, 0.1)
    # scaled by 4 (6) the spun-up flow outruns RK4 at dt 0.2 and needs dt/2 (dt/4)
    batch, th = torch.cat([x, 4 * x, 1.5 * x, 6 * x]), th1.expand(4, -1)
    start = torch.zeros(4, dtype=torch.int64)
    y, level = m.advance_refined(batch, th, 4, 0.2, start, 3)
    assert level.tolist() == [0, 1, 0, 2] and start.tolist() == [0, 0, 0, 0]
    fixed = m.advance(batch, th, 4, 0.2)
    assert not torch.isfinite(fixed[[1, 3]]).all() and torch.isfinite(y).all()
    assert torch.equal(y[[0, 2]], fixed[[0, 2]])  # the plain step, bit for bit
    for i, lv in enumerate(level.tolist()):
        alone = m.advance(batch[i:i + 1], th[i:i + 1], 4 << lv, 0.2 / (1 << lv))
        torch.testing.assert_close(y[i:i + 1], alone, rtol=1e-12, atol=1e-12)
        y1, lv1 = m.advance_refined(batch[i:i + 1], th[i:i + 1], 4, 0.2, start[:1], 3)
        torch.testing.assert_close(y1, y[i:i + 1], rtol=1e-12, atol=1e-12)
        assert lv1.tolist() == [lv]
    # no refinement allowed: failing rows come back past the cap, with the plain step's attempt
    y0, level0 = m.advance_refined(batch, th, 4, 0.2, start, 0)
    assert level0.tolist() == [0, 1, 0, 1] and torch.equal(y0.isfinite(), fixed.isfinite())
    # a row already refined starts at its own step
    y2, level2 = m.advance_refined(batch[1:2], th[1:2], 4, 0.2, torch.tensor([1]), 3)
    assert level2.tolist() == [1] and torch.equal(y2, y[1:2])


def test_advance_refined_bound_counts_as_failure():
    """Past ``bound`` a finite row fails too; one that fails at every step returns its attempt at
    the last step tried, with a level past the cap."""
    m = get_model("lorenz96", 8)
    x = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    th = torch.full((2, 1), 8.0, dtype=torch.float64)
    y, level = m.advance_refined(x, th, 2, 0.05, torch.zeros(2, dtype=torch.int64), 2, bound=1e-3)
    assert level.tolist() == [3, 3]
    assert torch.equal(y, m.advance(x, th, 8, 0.0125))
    y, level = m.advance_refined(x, th, 2, 0.05, torch.zeros(2, dtype=torch.int64), 2, bound=1e3)
    assert level.tolist() == [0, 0] and torch.equal(y, m.advance(x, th, 2, 0.05))
    empty = m.advance_refined(x[:0], th[:0], 2, 0.05, torch.zeros(0, dtype=torch.int64), 2)
    assert empty[0].shape == (0, 8) and empty[1].shape == (0,)
