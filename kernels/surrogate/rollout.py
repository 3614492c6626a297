"""Roll-outs of a history-window forecast model, plain and corrected by EnSF / EnKF, and metrics.

A *forecast* is any callable ``history (B, H, *state) -> next state (B, *state)``: a trained
:class:`~kernels.surrogate.nets.Surrogate`, or a true model wrapped by :func:`markov_forecast`
(so the same code runs a twin with the exact dynamics, which is what the tests use).

The filtered roll-out (Bao, Zhang, Tang et al., "A score filter enhanced data assimilation
framework for data-driven dynamical systems") advances an ensemble of histories with the
surrogate; at assimilation steps observations ``y = h(H x_true) + ε`` (e.g. arctan of all or of
some variables) are assimilated by :class:`kernels.assimilation.Analysis` (EnSF, stochastic EnKF
or LETKF) and the analysis becomes the newest frame of each member's window. Older frames are
*kept*, not re-corrected: each of them was itself the analysis (or forecast) of its step when it
entered the window, so the window always holds the corrected states in the order they were
produced, exactly what the surrogate was trained to read. Shifting past frames by the newest
increment would be a smoother step the surrogate never saw in training. The default schedule
(:func:`cycle_mask`) repeats 15 assimilation steps followed by 5 forecast-only steps.

Randomness: observation noise from the stream ``(seed, step, "obs")``; per member ``i`` at step
``t``, additive model noise from ``(seed, t, i, "model")`` and the analysis (EnSF reverse-SDE
noise, EnKF perturbed observations) from ``(seed, t, i, "analysis")``. Results therefore do not
depend on ``batch_size`` (how the forecast is split into batches); the analysis itself needs the
whole ensemble.

Stability: a surrogate's forecast ensemble is deterministic, so its spread only comes from the
initial perturbations and the analyses' noise, and with a biased model it collapses and the
filter stops listening to the data. Two documented remedies: multiplicative inflation of the
forecast anomalies (``FilterSpec.inflation``, and RTPS ``FilterSpec.rtps``) and additive model
noise (``additive_std``, a stand-in for the surrogate's error).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.assimilation import Analysis, FilterSpec
from kernels.dynamics.base import Dynamics
from kernels.ensemble import member_mean
from kernels.ensf import EnSFSettings
from kernels.metrics import rmse, spread
from kernels.observe import ObservationOperator, Sigma, add_noise
from kernels.streams import generator, per_member

Forecast = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "FilteredRollout",
    "Forecast",
    "cycle_mask",
    "default_filter",
    "filtered_rollout",
    "markov_forecast",
    "mean_std",
    "observe_trajectory",
    "perturbed_ensemble",
    "rmse_by_lead",
    "rollout",
]


def rollout(forecast: Forecast, history: torch.Tensor, steps: int) -> torch.Tensor:
    """Advance ``steps`` times, shifting the window by the new state each step.

    Differentiable when called with gradients enabled (the unrolled training loss uses it).

    Args:
        forecast: ``(B, H, *state) -> (B, *state)``.
        history: ``(B, H, *state)``, oldest frame first.
        steps: number of new states.

    Returns:
        ``(B, steps, *state)``, the states after the window (the window itself excluded).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    frames: list[torch.Tensor] = []
    hist = history
    for _ in range(steps):
        x = forecast(hist)
        frames.append(x)
        hist = torch.cat([hist[:, 1:], x.unsqueeze(1)], dim=1)
    if not frames:
        return history.new_zeros(history.shape[0], 0, *history.shape[2:])
    return torch.stack(frames, dim=1)


def markov_forecast(model: Dynamics, theta: torch.Tensor, substeps: int = 1,
                    dt: float | None = None) -> Forecast:
    """A true model as a forecast: reads only the newest frame of the window.

    Args:
        model: the dynamics.
        theta: ``(1, P)`` or ``(B, P)`` natural-space parameters (a single row is broadcast).
        substeps: model steps per forecast step (the surrogate's frame interval over ``dt``).
        dt: model step (``model.default_dt`` when None).

    Returns:
        ``(B, H, *state) -> (B, *state)``.
    """

    def forecast(history: torch.Tensor) -> torch.Tensor:
        b = history.shape[0]
        th = theta.to(history.dtype)
        th = th.expand(b, -1) if th.shape[0] == 1 else th
        return model.advance(history[:, -1], th, substeps, dt)

    return forecast


def cycle_mask(steps: int, assimilate: int = 15, forecast: int = 5, *, offset: int = 0) -> torch.Tensor:
    """Which steps assimilate: ``assimilate`` steps on, ``forecast`` steps off, repeated.

    Args:
        steps: length of the roll-out.
        assimilate: assimilation steps per cycle (>= 0).
        forecast: forecast-only steps per cycle (>= 0; 0 assimilates every step).
        offset: position of step 0 within the cycle (to continue a schedule).

    Returns:
        ``(steps,)`` bool.
    """
    if assimilate < 0 or forecast < 0 or assimilate + forecast == 0:
        raise ValueError(f"need assimilate, forecast >= 0 and a positive cycle, got {assimilate}, {forecast}")
    return (torch.arange(steps) + offset) % (assimilate + forecast) < assimilate


def observe_trajectory(op: ObservationOperator, truth: torch.Tensor, sigma: Sigma, seed: int,
                       *, start: int = 0) -> torch.Tensor:
    """Synthetic observations ``y_t = H(x_t) + σ ε_t`` of a true trajectory.

    Args:
        op: observation operator (e.g. ``Nonlinear.arctan(RandomMask(...))``).
        truth: ``(T, *state)``.
        sigma: noise std, a float or ``(m,)``.
        seed: noise for step ``t`` comes from the stream ``(seed, start + t, "obs")``.
        start: global index of ``truth[0]`` (so a split trajectory draws the same noise).

    Returns:
        ``(T, m)``, dtype and device of ``truth``.
    """
    clean = op(truth)
    return torch.stack([add_noise(clean[t], sigma, generator(seed, start + t, "obs"))
                        for t in range(truth.shape[0])])


def perturbed_ensemble(history: torch.Tensor, members: int, std: float, seed: int) -> torch.Tensor:
    """An initial ensemble of windows: ``history`` plus N(0, std²) noise per member and frame.

    Args:
        history: ``(H, *state)``.
        members: ``N``.
        std: perturbation std.
        seed: member ``i`` draws from the stream ``(seed, "init", i)``.

    Returns:
        ``(N, H, *state)``, dtype and device of ``history``.
    """
    noise = per_member(lambda g: torch.randn(tuple(history.shape), generator=g, dtype=torch.float64),
                       seed, range(members), "init")
    return history + (std * noise).to(dtype=history.dtype, device=history.device)


def default_filter(method: str = "ensf", **overrides: object) -> FilterSpec:
    """A :class:`~kernels.assimilation.FilterSpec` tuned for surrogate roll-outs with arctan data.

    EnSF: the per-variable Gaussian prior score (paired/mixture scores barely use the data or
    degenerate, see :mod:`kernels.ensf`) with the denoised likelihood (the recommended settings
    of :mod:`kernels.ensf`), and ensemble regression for unobserved variables. Measured on a
    trained conv surrogate of Lorenz-96 d = 20 (arctan of all variables, σ = 0.05, 20 members,
    15 + 5 cycles, RMSE over leads 100–200, 5 trials): denoised 0.23, damped
    ``likelihood="damped"`` 0.96, plain roll-out 4.8. With a strongly biased model (F = 6 for
    F = 8) the damped form did better (0.54 vs 0.75): the denoised step, scaled by ``J ≈ 1/α_t``
    near ``t = 1``, can throw particles of a wide forecast into the flat tails of arctan.
    EnKF: stochastic, perturbed observations. Both with multiplicative inflation 1.05 against
    the collapse of a deterministic surrogate ensemble (see the module docstring); ``overrides``
    replace any field.
    """
    if method == "ensf":
        base: dict[str, object] = {
            "method": "ensf", "inflation": 1.05, "coupling": "regression",
            "ensf": EnSFSettings(steps=100, estimator="gaussian", likelihood="denoised",
                                 score_clip=50.0, init="prior"),
        }
    elif method in ("enkf", "letkf"):
        base = {"method": method, "inflation": 1.05}
    else:
        raise ValueError(f"method must be ensf, enkf or letkf, got {method!r}")
    base.update(overrides)
    return FilterSpec(**base)  # type: ignore[arg-type]


@dataclass
class FilteredRollout:
    """Result of :func:`filtered_rollout` over ``T`` steps.

    Attributes:
        mean: ensemble mean after each step ``(T, *state)``: the analysis mean at assimilation
            steps, the forecast mean otherwise (the corrected trajectory, for retraining).
        forecast_mean: ensemble mean before the analysis ``(T, *state)``.
        spread: ensemble spread after each step ``(T,)`` (:func:`kernels.metrics.spread`).
        assimilated: ``(T,)`` bool, the steps with an analysis.
        members: every member after each step ``(T, N, *state)`` when asked for, else None.
        history: the members' windows after the last step ``(N, H, *state)`` (to continue).
    """

    mean: torch.Tensor
    forecast_mean: torch.Tensor
    spread: torch.Tensor
    assimilated: torch.Tensor
    members: torch.Tensor | None
    history: torch.Tensor


@torch.no_grad()
def filtered_rollout(
    forecast: Forecast,
    ensemble: torch.Tensor,
    observations: torch.Tensor,
    op: ObservationOperator,
    sigma: Sigma,
    spec: FilterSpec | None = None,
    *,
    assimilate: torch.Tensor | None = None,
    seed: int = 0,
    start: int = 0,
    additive_std: float = 0.0,
    batch_size: int | None = None,
    keep_members: bool = False,
    bounds: tuple[float, float] | None = None,
) -> FilteredRollout:
    """Roll an ensemble of windows forward with ``forecast``, assimilating on schedule.

    Each step: forecast every member (in batches of ``batch_size``), add model noise if asked,
    and at assimilation steps replace the new states by the analysis of ``observations[t]``;
    the new states then enter the windows (older frames kept, see the module docstring).

    Args:
        forecast: ``(B, H, *state) -> (B, *state)``.
        ensemble: initial windows ``(N, H, *state)``.
        observations: ``(T, m)``; row ``t`` observes the state after step ``t`` (rows of
            forecast-only steps are ignored and may be NaN).
        op: the observation operator of ``observations`` (its ``state_shape`` is the state's).
        sigma: observation noise std, a float or ``(m,)``.
        spec: the analysis (``default_filter("ensf")`` when None).
        assimilate: ``(T,)`` bool schedule (``cycle_mask(T)``: 15 on, 5 off, when None).
        seed: key of every random stream.
        start: global index of step 0 in the stream keys (to continue a roll-out).
        additive_std: std of Gaussian noise added to every forecast member (0 = none).
        batch_size: members per forecast call (None: all at once).
        keep_members: also return every member at every step.
        bounds: clamp every member to ``[lo, hi]`` after each step (None: no clamp). A surrogate
            says nothing about states far outside its training range, and a particle that an
            analysis pushes into the flat tail of arctan gets no gradient back; unclamped, such
            outliers feed the regression of unobserved variables and can make a roll-out
            diverge (seen with 5 of 20 Lorenz-96 variables observed and a strongly biased model).
            A few training-data standard deviations around the mean is a sensible range.

    Returns:
        :class:`FilteredRollout`.
    """
    n, h = ensemble.shape[:2]
    state_shape = tuple(ensemble.shape[2:])
    if state_shape != tuple(op.state_shape):
        raise ValueError(f"ensemble states {state_shape} do not match the operator's {op.state_shape}")
    if n < 2:
        raise ValueError("a filtered roll-out needs at least 2 members")
    steps = observations.shape[0]
    if observations.ndim != 2 or observations.shape[1] != op.m:
        raise ValueError(f"observations must be (T, {op.m}), got {tuple(observations.shape)}")
    mask = cycle_mask(steps) if assimilate is None else assimilate.to(torch.bool).cpu()
    if mask.shape != (steps,):
        raise ValueError(f"assimilate must be ({steps},), got {tuple(mask.shape)}")
    spec = default_filter("ensf") if spec is None else spec
    analysis = Analysis(op, sigma, 0, spec)
    if bounds is not None and not bounds[0] < bounds[1]:
        raise ValueError(f"bounds must be (lo, hi) with lo < hi, got {bounds!r}")
    bs = n if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    hist = ensemble
    mean = ensemble.new_empty(steps, *state_shape)
    fmean = ensemble.new_empty(steps, *state_shape)
    spr = ensemble.new_empty(steps)
    members = ensemble.new_empty(steps, n, *state_shape) if keep_members else None
    for t in range(steps):
        key = start + t
        x = torch.cat([forecast(hist[s:s + bs]) for s in range(0, n, bs)])
        if additive_std > 0:
            eps = per_member(lambda g: torch.randn(state_shape, generator=g, dtype=torch.float64),
                             seed, range(n), key, "model")
            x = x + (additive_std * eps).to(x)
        fmean[t] = member_mean(x)
        if bool(mask[t]):
            gens = [generator(seed, key, i, "analysis") for i in range(n)]
            x = analysis(x.reshape(n, -1), observations[t].to(x), gens).reshape(n, *state_shape)
        if bounds is not None:
            x = x.clamp(bounds[0], bounds[1])
        mean[t] = member_mean(x)
        spr[t] = spread(x.reshape(n, -1))
        if members is not None:
            members[t] = x
        hist = torch.cat([hist[:, 1:], x.unsqueeze(1)], dim=1) if h > 1 else x.unsqueeze(1)
    return FilteredRollout(mean, fmean, spr, mask, members, hist)


def rmse_by_lead(estimate: torch.Tensor, truth: torch.Tensor, state_ndim: int = 1) -> torch.Tensor:
    """RMSE over the state at every lead time.

    Args:
        estimate: ``(..., L, *state)`` (e.g. trials × lead times).
        truth: same shape (or broadcastable).
        state_ndim: number of state axes averaged over.

    Returns:
        ``(..., L)``.
    """
    flat = estimate.reshape(*estimate.shape[: estimate.ndim - state_ndim], -1)
    ref = truth.reshape(*truth.shape[: truth.ndim - state_ndim], -1)
    return rmse(flat, ref)


def mean_std(values: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased; 0 for one trial) standard deviation over trials.

    Args:
        values: e.g. ``(R, L)`` RMSE of ``R`` trials at ``L`` lead times.
        dim: the trial axis.

    Returns:
        ``(mean, std)``, each with ``dim`` removed.
    """
    m = values.mean(dim)
    if values.shape[dim] < 2:
        return m, torch.zeros_like(m)
    return m, values.std(dim)
