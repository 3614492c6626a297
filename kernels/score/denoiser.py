"""Window denoiser, data normalisation and the denoising score-matching loss.

A :class:`WindowDenoiser` wraps a noise-prediction network (:mod:`kernels.score.nets`), the
schedule (:class:`~kernels.score.schedule.VPSchedule`) and a :class:`Normalizer`. It works in the
*normalised* space, where each state channel and each parameter has zero mean and unit
variance over the training data; there ``x_t = μ x_0 + σ ε`` has unit variance at every ``t``,
and ``E[x_0] = 0``, so the trivial denoiser ``x̂_0 = 0`` and the trivial noise predictor
``ε̂ = 0`` are the natural baselines (both have error 1 on the training distribution).

θ is handled in its unconstrained space (``Param.to_unconstrained``): the caller converts
before :meth:`Normalizer.encode` and after :meth:`Normalizer.decode`.

Loss weighting: the state part of a window has ``W·C·|spatial|`` entries, θ only ``W·P``. A
plain mean over all entries would let θ count for almost nothing (1/40 of the loss for a
40-variable Lorenz-96 ring with one parameter). :func:`dsm_loss` therefore averages the squared
error per entry within each group and combines the two group means as
``(L_state + w L_θ) / (1 + w)`` with ``w = theta_weight`` (default 1: θ counts as much as the
whole state). The normalisation by ``1 + w`` keeps the trivial predictor's loss at 1 whatever
``w`` is, so losses are comparable across settings.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from kernels.score.schedule import VPSchedule


class Normalizer(nn.Module):
    """Per-channel affine normalisation of the state and per-parameter normalisation of θ.

    Statistics are buffers, so they travel in the ``state_dict`` with the network weights and a
    checkpoint is self-contained.

    Standard deviations are floored at ``min_std``: a channel that is constant in the training
    data (a parameter held fixed in a data set, a velocity component that is zero) has std 0, and
    dividing by it would give inf/NaN. The floor keeps the map finite while a deviation of
    ``min_std`` from the constant still reads as O(1) in normalised units. The default 1e-3 fits
    the O(1) magnitudes of the models here (Lorenz-96 std ≈ 3.6, FitzHugh–Nagumo and Kolmogorov
    O(1), θ prior scales 0.1–2 in unconstrained space).
    """

    state_mean: torch.Tensor
    state_std: torch.Tensor
    theta_mean: torch.Tensor
    theta_std: torch.Tensor

    def __init__(self, channels: int, n_params: int, spatial_ndim: int, *, min_std: float = 1e-3) -> None:
        """Identity normalisation (mean 0, std 1); load statistics with :meth:`from_stats`,
        :meth:`from_data` or ``load_state_dict``.

        Args:
            channels: state channels ``C``.
            n_params: parameters ``P`` (may be 0).
            spatial_ndim: number of spatial axes after the channel axis (1 for rings, 2 for
                Kolmogorov); fixes where the channel axis is, so any leading axes are allowed.
            min_std: floor applied to the standard deviations.
        """
        super().__init__()
        if channels < 1 or n_params < 0 or spatial_ndim < 0:
            raise ValueError(f"bad normalizer shape: channels={channels}, n_params={n_params}, "
                             f"spatial_ndim={spatial_ndim}")
        if not min_std > 0:
            raise ValueError(f"min_std must be > 0, got {min_std}")
        self.spatial_ndim = int(spatial_ndim)
        self.min_std = float(min_std)
        self.register_buffer("state_mean", torch.zeros(channels))
        self.register_buffer("state_std", torch.ones(channels))
        self.register_buffer("theta_mean", torch.zeros(n_params))
        self.register_buffer("theta_std", torch.ones(n_params))

    @classmethod
    def from_stats(
        cls,
        state_mean: torch.Tensor,
        state_std: torch.Tensor,
        theta_mean: torch.Tensor,
        theta_std: torch.Tensor,
        *,
        spatial_ndim: int,
        min_std: float = 1e-3,
    ) -> Normalizer:
        """Build from statistics: ``state_* (C,)``, ``theta_* (P,)`` (θ in unconstrained space)."""
        norm = cls(state_mean.numel(), theta_mean.numel(), spatial_ndim, min_std=min_std)
        norm.set_stats(state_mean, state_std, theta_mean, theta_std)
        return norm

    @classmethod
    def from_data(
        cls, state: torch.Tensor, theta: torch.Tensor, *, spatial_ndim: int, min_std: float = 1e-3
    ) -> Normalizer:
        """Fit to samples: ``state (..., C, *spatial)`` and ``theta (..., P)`` (unconstrained).

        Means and standard deviations are pooled over every axis but the channel / parameter
        axis, in float64.
        """
        ch = state.dim() - spatial_ndim - 1
        if ch < 0:
            raise ValueError(f"state {tuple(state.shape)} has fewer than {spatial_ndim + 1} axes")
        s = state.double().movedim(ch, 0).reshape(state.shape[ch], -1)
        p = theta.double().reshape(-1, theta.shape[-1])
        return cls.from_stats(s.mean(1), s.std(1, correction=0), p.mean(0), p.std(0, correction=0),
                              spatial_ndim=spatial_ndim, min_std=min_std)

    def set_stats(
        self, state_mean: torch.Tensor, state_std: torch.Tensor, theta_mean: torch.Tensor,
        theta_std: torch.Tensor,
    ) -> None:
        """Overwrite the statistics in place (shapes ``(C,)`` and ``(P,)``), flooring the stds."""
        for name, value in (("state_mean", state_mean), ("state_std", state_std),
                            ("theta_mean", theta_mean), ("theta_std", theta_std)):
            buf = getattr(self, name)
            value = torch.as_tensor(value).reshape(-1)
            if value.shape != buf.shape or not torch.isfinite(value).all():
                raise ValueError(f"{name} must be finite with shape {tuple(buf.shape)}, "
                                 f"got {tuple(value.shape)}")
            if name.endswith("std"):
                value = value.clamp(min=self.min_std)
            buf.copy_(value)

    def _state_view(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.to(like.dtype).reshape(-1, *([1] * self.spatial_ndim))

    def encode(self, state: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Physical ``state (..., C, *spatial)`` and unconstrained ``theta (..., P)`` -> normalised."""
        m, s = self._state_view(self.state_mean, state), self._state_view(self.state_std, state)
        tm, ts = self.theta_mean.to(theta.dtype), self.theta_std.to(theta.dtype)
        return (state - m) / s, (theta - tm) / ts

    def decode(self, state: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`encode`."""
        m, s = self._state_view(self.state_mean, state), self._state_view(self.state_std, state)
        tm, ts = self.theta_mean.to(theta.dtype), self.theta_std.to(theta.dtype)
        return state * s + m, theta * ts + tm

    def encode_theta_gaussian(
        self, mean: torch.Tensor, std: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A Gaussian ``N(mean, std²)`` of unconstrained θ ``(P,)`` in normalised units
        (stds floored at 1e-6 so a degenerate prior stays finite)."""
        m = torch.as_tensor(mean, dtype=self.theta_mean.dtype, device=self.theta_mean.device)
        s = torch.as_tensor(std, dtype=self.theta_std.dtype, device=self.theta_std.device)
        return (m - self.theta_mean) / self.theta_std, (s / self.theta_std).clamp_min(1e-6)


class WindowDenoiser(nn.Module):
    """Noise predictor, denoiser and score of a diffused window, all in normalised space.

    Inputs are ``x_state (B, W, C, *spatial)``, ``x_theta (B, W, P)`` and ``t`` (scalar or
    ``(B,)``). Use ``normalizer`` to move clean windows in and estimates out; a score in
    physical units is the normalised one divided by the std of its channel.
    """

    def __init__(
        self,
        network: nn.Module,
        normalizer: Normalizer,
        schedule: VPSchedule | None = None,
        forcing: torch.Tensor | None = None,
    ) -> None:
        """Args:
            network: a window network (:func:`~kernels.score.nets.build_network`).
            normalizer: the training data's statistics.
            schedule: noise schedule (``VPSchedule()`` when None); not saved in the state dict.
            forcing: constant auxiliary fields ``(F, *spatial)`` for a network built with
                ``forcing = F``; a buffer, so saved with the weights.
        """
        super().__init__()
        self.network = network
        self.normalizer = normalizer
        self.schedule = VPSchedule() if schedule is None else schedule
        self.register_buffer("forcing", forcing)

    def _t(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        return t.expand(x.shape[0]) if t.dim() == 0 else t

    def eps(
        self, x_state: torch.Tensor, x_theta: torch.Tensor, t: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted noise ``ε̂`` of ``(x_state, x_theta)`` at time ``t``; same shapes as the inputs."""
        t = self._t(t, x_state)
        if self.forcing is None:
            return self.network(x_state, x_theta, t)
        return self.network(x_state, x_theta, t, forcing=self.forcing)

    forward = eps

    def _eps_scales(self, x_state: torch.Tensor, x_theta: torch.Tensor, t: torch.Tensor | float):
        """``ε̂`` of both groups with their broadcastable ``(μ, σ)``."""
        e_state, e_theta = self.eps(x_state, x_theta, t)
        t = self._t(t, x_state)
        return e_state, e_theta, self.schedule.mu_sigma(t, x_state), self.schedule.mu_sigma_theta(t, x_theta)

    def denoise(
        self, x_state: torch.Tensor, x_theta: torch.Tensor, t: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Estimate of the clean window ``x̂_0 = (x_t − σ ε̂) / μ`` (Tweedie's posterior mean)."""
        e_state, e_theta, (mu, sigma), (mu_p, sigma_p) = self._eps_scales(x_state, x_theta, t)
        return (x_state - sigma * e_state) / mu, (x_theta - sigma_p * e_theta) / mu_p

    def score(
        self, x_state: torch.Tensor, x_theta: torch.Tensor, t: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score ``∇ log p_t(x_t) ≈ −ε̂ / σ(t)`` of the diffused window."""
        e_state, e_theta, (_, sigma), (_, sigma_p) = self._eps_scales(x_state, x_theta, t)
        return -e_state / sigma, -e_theta / sigma_p


def _combine(err_state: torch.Tensor, err_theta: torch.Tensor, theta_weight: float) -> torch.Tensor:
    """Per-group mean squared errors combined as ``(L_state + w L_θ) / (1 + w)``."""
    if not theta_weight >= 0:
        raise ValueError(f"theta_weight must be >= 0, got {theta_weight}")
    loss = err_state.square().mean()
    if err_theta.numel() == 0 or theta_weight == 0:
        return loss
    return (loss + theta_weight * err_theta.square().mean()) / (1.0 + theta_weight)


def draw_noise(
    state: torch.Tensor, theta: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``t ~ U(0, 1) (B,)`` and standard normal noise for the state and θ, in this order."""
    kw = dict(generator=generator, dtype=state.dtype, device=state.device)
    t = torch.rand(state.shape[0], **kw)
    return t, torch.randn(state.shape, **kw), torch.randn(theta.shape, **kw)


def dsm_loss(
    denoiser: WindowDenoiser,
    state: torch.Tensor,
    theta: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    theta_weight: float = 1.0,
    draws: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    module: nn.Module | None = None,
) -> torch.Tensor:
    """Denoising score-matching loss in the ε parameterisation.

    Draws ``t ~ U(0, 1)`` per window and ``ε ~ N(0, I)``, diffuses the normalised clean window
    and returns ``(‖ε̂_state − ε_state‖²/n_state + w ‖ε̂_θ − ε_θ‖²/n_θ) / (1 + w)`` (module
    docstring: why per-group means). The trivial predictor ``ε̂ = 0`` scores 1 in expectation
    (exactly: :func:`trivial_dsm_loss` with the same generator state).

    Args:
        denoiser: the model.
        state: clean windows in physical units ``(B, W, C, *spatial)``.
        theta: their parameters in unconstrained space ``(B, W, P)``.
        generator: random stream for ``t`` and ``ε`` (on the device of ``state``); the same
            generator state gives the same loss.
        theta_weight: ``w``, the weight of the θ group relative to the state group (``>= 0``).
        draws: ``(t (B,), ε_state, ε_θ)`` drawn by the caller instead of from ``generator``
            (distributed training draws a global batch's noise and keeps its rows).
        module: what to call for ``ε̂`` instead of ``denoiser`` itself — a
            ``DistributedDataParallel`` wrapper of it, whose gradient hooks run only through
            its ``forward``.

    Returns:
        Scalar loss.
    """
    x_state, x_theta = denoiser.normalizer.encode(state, theta)
    t, n_state, n_theta = draw_noise(x_state, x_theta, generator) if draws is None else draws
    sched = denoiser.schedule
    net = denoiser if module is None else module
    e_state, e_theta = net(sched.perturb(x_state, t, n_state), sched.perturb_theta(x_theta, t, n_theta), t)
    return _combine(e_state - n_state, e_theta - n_theta, theta_weight)


def trivial_dsm_loss(
    state: torch.Tensor,
    theta: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    theta_weight: float = 1.0,
) -> torch.Tensor:
    """:func:`dsm_loss` of the trivial predictor ``ε̂ = 0`` on the same draws (``≈ 1``).

    Consumes the generator exactly as :func:`dsm_loss` does, so a generator in the same state
    gives the baseline for the very same ``t`` and ``ε``.
    """
    _, n_state, n_theta = draw_noise(state, theta, generator)
    return _combine(n_state, n_theta, theta_weight)


class DenoisingError(NamedTuple):
    """Mean squared error of ``x̂_0`` in normalised space: the model's and the trivial one's."""

    learned: torch.Tensor
    trivial: torch.Tensor


@torch.no_grad()
def denoising_error(
    denoiser: WindowDenoiser,
    state: torch.Tensor,
    theta: torch.Tensor,
    t: torch.Tensor | float,
    noise: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    generator: torch.Generator | None = None,
    theta_weight: float = 1.0,
) -> DenoisingError:
    """How well the denoiser recovers clean (held-out) windows from noise level ``t``.

    Both errors are in normalised space and combined over state and θ as in :func:`dsm_loss`.
    The trivial denoiser is ``x̂_0 = E[x_0] = 0`` (the normaliser centres the training data), so
    its error is the mean square of the normalised clean window, ≈ 1 on the training
    distribution; a useful denoiser must do better at every ``t``.

    Args:
        denoiser: the model.
        state: clean windows in physical units ``(B, W, C, *spatial)``.
        theta: unconstrained parameters ``(B, W, P)``.
        t: noise level, scalar or ``(B,)``.
        noise: ``(ε_state, ε_θ)`` to use; drawn from ``generator`` when None.
        generator: random stream for the noise when ``noise`` is None.
        theta_weight: weight of the θ group, as in :func:`dsm_loss`.

    Returns:
        ``DenoisingError(learned, trivial)``, two scalars.
    """
    x_state, x_theta = denoiser.normalizer.encode(state, theta)
    if noise is None:
        kw = dict(generator=generator, dtype=x_state.dtype, device=x_state.device)
        noise = torch.randn(x_state.shape, **kw), torch.randn(x_theta.shape, **kw)
    sched = denoiser.schedule
    d_state, d_theta = denoiser.denoise(
        sched.perturb(x_state, t, noise[0]), sched.perturb_theta(x_theta, t, noise[1]), t
    )
    return DenoisingError(_combine(d_state - x_state, d_theta - x_theta, theta_weight),
                          _combine(x_state, x_theta, theta_weight))
