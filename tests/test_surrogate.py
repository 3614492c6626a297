"""Surrogates: pairs, exact learning of a linear ring system, roll-outs, EnSF/EnKF-corrected
roll-outs of a biased model, batch independence, dtypes."""

from __future__ import annotations

import pytest
import torch

from kernels.dynamics.lorenz96 import Lorenz96
from kernels.observe import EveryKth, Identity, Nonlinear
from kernels.streams import generator
from kernels.surrogate import (
    ConvSurrogate,
    add_trajectory_noise,
    analysis_pairs,
    build_surrogate,
    cycle_mask,
    default_filter,
    filtered_rollout,
    fit,
    make_pairs,
    markov_forecast,
    mean_std,
    observe_trajectory,
    one_step_loss,
    one_step_rmse,
    perturbed_ensemble,
    rmse_by_lead,
    rollout,
    unrolled_loss,
)

F64 = torch.float64


def _randomize(net: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Give the zero-initialised output layers small random weights (a non-trivial net)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(p + scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


# --------------------------------------------------------------------------------------------
# pairs and noise
@pytest.mark.parametrize("stride", [1, 2])
def test_pairs_match_naive_loop(stride):
    traj = torch.randn(2, 11, 3, 5, dtype=F64)  # (N, T, C, n)
    hist, tgt = make_pairs(traj, 3, 2, state_ndim=2, stride=stride)
    naive_h, naive_t = [], []
    for i in range(2):
        for s in range(0, 11 - 5 + 1, stride):
            naive_h.append(traj[i, s:s + 3])
            naive_t.append(traj[i, s + 3:s + 5])
    assert torch.equal(hist, torch.stack(naive_h)) and torch.equal(tgt, torch.stack(naive_t))
    # one trajectory (T, n) is the N = 1 case
    h1, t1 = make_pairs(traj[0, :, 0], 3, 1)
    assert h1.shape == (8, 3, 5) and torch.equal(t1[:, 0], traj[0, 3:, 0])
    with pytest.raises(ValueError):
        make_pairs(traj[:, :4], 3, 2, state_ndim=2)


def test_analysis_pairs_select_analysed_targets():
    initial, states = torch.randn(2, 4, dtype=F64), torch.randn(6, 4, dtype=F64)
    keep = torch.tensor([True, False, True, True, False, True])
    hist, tgt = analysis_pairs(initial, states, keep)
    full = torch.cat([initial, states])
    idx = [j for j in range(6) if keep[j]]
    assert torch.equal(tgt, states[idx])
    assert torch.equal(hist, torch.stack([full[j:j + 2] for j in idx]))


def test_trajectory_noise_is_keyed_per_trajectory():
    traj = torch.zeros(3, 7, 4, dtype=F64)
    noisy = add_trajectory_noise(traj, 0.5, 1, "noise")
    alone = add_trajectory_noise(traj[0], 0.5, 1, "noise")  # trajectory 0 on its own
    assert torch.equal(noisy[0], alone)
    assert not torch.equal(noisy[0], noisy[1])
    assert 0.3 < float(noisy.std()) < 0.7


# --------------------------------------------------------------------------------------------
# networks
def test_build_checks_options_and_state_dict_carries_normalization():
    with pytest.raises(ValueError, match="unknown option"):
        build_surrogate("conv", history=2, depthh=3)
    with pytest.raises(ValueError, match="size"):
        build_surrogate("mlp", history=2)
    with pytest.raises(ValueError, match="wrap"):
        build_surrogate("conv", history=2, dilations=[1, 8, 16, 32], size=20)
    net = build_surrogate("conv", history=2, width=8, depth=2)
    net.fit_normalization(3.0 + 2.0 * torch.randn(2, 50, 10))
    clone = build_surrogate(**net.spec)
    clone.load_state_dict(net.state_dict())
    assert torch.equal(clone.mean, net.mean) and torch.equal(clone.step_scale, net.step_scale)
    assert abs(float(net.mean) - 3.0) < 0.2 and abs(float(net.scale) - 2.0) < 0.2


def test_untrained_network_is_persistence_and_translation_equivariant():
    net = build_surrogate("conv", history=3, width=8, depth=2)
    hist = torch.randn(4, 3, 12)
    assert torch.equal(net(hist), hist[:, -1])
    _randomize(net)
    out = net(hist)
    assert torch.allclose(net(torch.roll(hist, 5, -1)), torch.roll(out, 5, -1), atol=1e-5)
    # the same weights run on a longer ring; the MLP is tied to its size
    assert net(torch.randn(2, 3, 40)).shape == (2, 40)
    mlp = build_surrogate("mlp", history=3, size=12, hidden=16)
    assert torch.equal(mlp(hist), hist[:, -1])


def _circulant_step(prev: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """A linear ring system with memory: x_{t+1} = 0.6 x_t + 0.25 x_t[i−1] − 0.15 x_{t−1}[i+2]."""
    return 0.6 * last + 0.25 * torch.roll(last, 1, -1) - 0.15 * torch.roll(prev, -2, -1)


def test_learns_circulant_linear_system_exactly(one_thread):
    g = torch.Generator().manual_seed(0)
    start = torch.randn(512, 2, 16, generator=g)
    traj = torch.cat([start, _circulant_step(start[:, 0], start[:, 1])[:, None]], dim=1)  # (N, 3, d)
    net = ConvSurrogate(2, width=16, depth=2, kernel_size=3, linear_kernel=5)
    net.fit_normalization(traj)
    hist, tgt = make_pairs(traj, 2)
    losses = fit(net, hist, tgt, steps=600, generator=torch.Generator().manual_seed(1),
                 batch_size=128, lr=1e-2)
    assert losses[0] > 0.1 and losses[-50:].mean() < 1e-4, (losses[0], losses[-50:].mean())
    # exact on fresh data, on a longer ring (translation equivariance), and over a roll-out
    with torch.no_grad():
        h0 = torch.randn(4, 2, 48, generator=g)
        ref = [h0[:, 0], h0[:, 1]]
        for _ in range(10):
            ref.append(_circulant_step(ref[-2], ref[-1]))
        pred = rollout(net, h0, 10)
        err = (pred - torch.stack(ref[2:], dim=1)).abs().max()
    # the nonlinear path leaves a ~1e-5 loss floor (Adam noise in float32): ~0.5 % after 10 steps
    assert err < 1e-2 * float(h0.abs().max()), err
    assert float(one_step_rmse(net, hist, tgt[:, 0])) < 1e-2


def test_rollout_shape_determinism_and_losses():
    net = _randomize(build_surrogate("conv", history=2, channels=2, width=8, depth=2))
    hist = torch.randn(3, 2, 2, 10)  # (B, H, C, n)
    a, b = rollout(net, hist, 5), rollout(net, hist, 5)
    assert a.shape == (3, 5, 2, 10) and torch.equal(a, b)
    # the unrolled loss is the mean squared normalised error of the roll-out; K = 1 is one step
    targets = torch.randn(3, 5, 2, 10)
    want = ((a - targets) / net.step_scale).square().mean()
    assert torch.allclose(unrolled_loss(net, hist, targets), want)
    assert torch.allclose(unrolled_loss(net, hist, targets[:, :1]), one_step_loss(net, hist, targets))
    # a true model wrapped as a forecast reproduces its own roll-out
    model = Lorenz96(8)
    theta = model.truth_theta(1, dtype=F64)
    x0 = model.initial_state(2, torch.Generator().manual_seed(0), dtype=F64)
    ref = model.rollout(x0, theta.expand(2, -1), 6, include_initial=False)
    out = rollout(markov_forecast(model, theta), torch.stack([x0, x0], 1), 6)
    assert torch.equal(out, ref)


# --------------------------------------------------------------------------------------------
# filtered roll-outs
def _l96_twin(seed: int = 0, steps: int = 40):
    model = Lorenz96(20)
    theta = model.truth_theta(1, dtype=F64)
    x0 = model.advance(model.initial_state(1, generator(seed, "truth"), dtype=F64), theta, 200)
    traj = model.rollout(x0, theta, steps)[0]  # (steps + 1, d)
    return model, traj[:1], traj[1:]


def test_cycle_mask_default_is_15_on_5_off():
    mask = cycle_mask(45)
    assert mask[:15].all() and not mask[15:20].any() and mask[20:35].all() and not mask[35:40].any()
    assert mask[40:].all()
    assert torch.equal(cycle_mask(10, 3, 2, offset=4), cycle_mask(14, 3, 2)[4:])


@pytest.mark.parametrize("method,bound", [("ensf", 0.3), ("enkf", 0.6)])
def test_filter_corrects_a_biased_model(method, bound, one_thread):
    """Lorenz-96 with F = 6 as the 'surrogate' of the F = 8 truth, arctan of all 20 variables,
    σ = 0.05, 20 members, two 15 + 5 cycles. Measured over seeds 0–2, RMSE over the last 20
    steps: plain 3.6–3.9, EnSF 0.68–0.85 (damped likelihood: 0.43–0.59), EnKF 1.6–1.7."""
    model, h0, truth = _l96_twin()
    biased = markov_forecast(model, model.truth_theta(1, {"F": 6.0}, dtype=F64))
    op = Nonlinear.arctan(Identity((20,)))
    y = observe_trajectory(op, truth, 0.05, 1)
    plain = rmse_by_lead(rollout(biased, h0[None], 40)[0], truth)[-20:].mean()
    out = filtered_rollout(biased, perturbed_ensemble(h0, 20, 0.5, 2), y, op, 0.05,
                           default_filter(method), seed=3)
    err = rmse_by_lead(out.mean, truth)[-20:].mean()
    assert plain > 2.5 and err < bound * plain, (float(err), float(plain))
    assert torch.equal(out.assimilated, cycle_mask(40))
    # forecast-only steps leave the forecast mean as it is; analyses move it
    free = ~out.assimilated
    assert torch.equal(out.mean[free], out.forecast_mean[free])
    assert (out.mean[out.assimilated] - out.forecast_mean[out.assimilated]).abs().amax(-1).min() > 0


def test_partial_observations_with_bounds_stay_finite(one_thread):
    model, h0, truth = _l96_twin(1, 30)
    biased = markov_forecast(model, model.truth_theta(1, {"F": 7.5}, dtype=F64))
    op = Nonlinear.arctan(EveryKth((20,), 4))  # 5 of 20 variables
    y = observe_trajectory(op, truth, 0.05, 1)
    out = filtered_rollout(biased, perturbed_ensemble(h0, 20, 0.5, 2), y, op, 0.05, seed=3,
                           bounds=(-12.0, 16.0), keep_members=True)
    assert torch.isfinite(out.members).all() and out.members.amax() <= 16.0
    assert out.members.shape == (30, 20, 20) and out.history.shape == (20, 1, 20)


def test_local_coupling_tracks_a_half_observed_ring(one_thread):
    """EnSF with arctan observations of every other Lorenz-96 variable and the true model:
    the global regression of the unobserved half on all observed increments fits sampling noise
    with 20 members and loses the truth; the localized one (neighbours within 2·radius) keeps
    it. Measured, RMSE over the last 100 of 200 steps, seeds 0/1/2: global (ridge 1e-3)
    1.09/7.33/5.30, local (radius 2, ridge 0.1) 0.34/0.22/0.33; free run ≈ 5."""
    model, h0, truth = _l96_twin(1, 200)
    fc = markov_forecast(model, model.truth_theta(1, dtype=F64))
    op = Nonlinear.arctan(EveryKth((20,), 2))
    y = observe_trajectory(op, truth, 0.05, 1)
    err = {}
    for coupling, ridge in (("regression", 1e-3), ("local", 0.1)):
        spec = default_filter("ensf", coupling=coupling, radius=2.0, ridge=ridge)
        out = filtered_rollout(fc, perturbed_ensemble(h0, 20, 0.5, 2), y, op, 0.05, spec, seed=3,
                               bounds=(-12.0, 16.0))
        err[coupling] = float(rmse_by_lead(out.mean, truth)[-100:].mean())
    assert err["local"] < 0.6 and err["regression"] > 2.0, err


@pytest.mark.parametrize("method", ["ensf", "enkf"])
def test_results_do_not_depend_on_forecast_batches(method, one_thread):
    torch.manual_seed(0)  # nothing below may use the global RNG: a reseed must not matter
    net = _randomize(build_surrogate("conv", history=2, width=8, depth=2)).double()
    model, h0, truth = _l96_twin(2, 12)
    net.fit_normalization(truth)
    op = Nonlinear.arctan(Identity((20,)))
    y = observe_trajectory(op, truth, 0.05, 1)
    ens = perturbed_ensemble(torch.cat([h0, truth[:1]]), 10, 0.5, 2)
    kw = dict(spec=default_filter(method), seed=4, additive_std=0.1, assimilate=cycle_mask(11, 3, 2))
    whole = filtered_rollout(net, ens, y[1:], op, 0.05, **kw)
    torch.manual_seed(123)
    split = filtered_rollout(net, ens, y[1:], op, 0.05, batch_size=3, **kw)
    assert torch.allclose(whole.mean, split.mean, rtol=0, atol=1e-10)
    assert torch.allclose(whole.spread, split.spread, rtol=0, atol=1e-10)
    other = filtered_rollout(net, ens, y[1:], op, 0.05, **{**kw, "seed": 5})
    assert not torch.allclose(whole.mean, other.mean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes(dtype, one_thread):
    net = _randomize(build_surrogate("conv", history=2, width=8, depth=2))
    if dtype == torch.float64:
        net = net.double()
    model, h0, truth = _l96_twin(0, 10)
    net.fit_normalization(truth.to(dtype))
    op = Nonlinear.arctan(Identity((20,)))
    y = observe_trajectory(op, truth.to(dtype), 0.05, 1)
    ens = perturbed_ensemble(torch.cat([h0, truth[:1]]).to(dtype), 8, 0.5, 2)
    for method in ("ensf", "enkf"):
        out = filtered_rollout(net, ens, y[1:], op, 0.05, default_filter(method), seed=0)
        assert out.mean.dtype == dtype and out.spread.dtype == dtype
        assert torch.isfinite(out.mean).all()
    assert rollout(net, ens, 3).dtype == dtype


def test_lead_time_metrics():
    est, truth = torch.randn(4, 6, 5, dtype=F64), torch.randn(4, 6, 5, dtype=F64)
    e = rmse_by_lead(est, truth)
    assert e.shape == (4, 6)
    assert torch.allclose(e[2, 3], (est[2, 3] - truth[2, 3]).square().mean().sqrt())
    m, s = mean_std(e)
    assert torch.allclose(m, e.mean(0)) and torch.allclose(s, e.std(0))
    m1, s1 = mean_std(e[:1])
    assert torch.equal(m1, e[0]) and not s1.any()


@pytest.mark.gpu
def test_filtered_rollout_on_device_matches_cpu(device):
    """The same EnSF/EnKF-corrected roll-out on the device as on the CPU (float64: the keyed
    draws are the same numbers, only rounding differs over 10 steps)."""
    net = _randomize(build_surrogate("conv", history=2, width=8, depth=2)).double()
    model, h0, truth = _l96_twin(1, 10)
    net.fit_normalization(truth)
    op = Nonlinear.arctan(Identity((20,)))
    y = observe_trajectory(op, truth, 0.05, 1)
    ens = perturbed_ensemble(torch.cat([h0, truth[:1]]), 8, 0.5, 2)
    for method in ("ensf", "enkf"):
        cpu = filtered_rollout(net, ens, y[1:], op, 0.05, default_filter(method), seed=0)
        dev = filtered_rollout(net.to(device), ens.to(device), y[1:].to(device), op, 0.05,
                               default_filter(method), seed=0)
        net.cpu()
        assert dev.mean.device.type == device.type
        assert torch.allclose(dev.mean.cpu(), cpu.mean, rtol=0, atol=1e-6), method
