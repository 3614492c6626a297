"""Variance-preserving cosine noise schedule of SDA (Rozet & Louppe, 2023).

The forward (noising) process is ``x_t = μ(t) x_0 + σ(t) ε`` with ``ε ~ N(0, I)`` and

    μ(t) = cos(acos(√η) t)²,        σ(t) = √(1 − μ(t)² + η²),        t ∈ [0, 1].

So ``μ(0) = 1, σ(0) = η`` (almost clean data) and ``μ(1) = η, σ(1) = 1`` (almost pure noise), and
``μ² + σ² = 1 + η²``: for data normalised to unit variance every ``x_t`` has unit variance up
to ``η²``, which is why the networks need no input preconditioning. The small ``η`` keeps ``σ``
away from 0 (the score ``−ε/σ`` stays finite) and ``μ`` away from 0 (``x_0 = (x_t − σ ε)/μ``
stays defined).

θ may run on a lagging clock (``theta_lag`` κ ≥ 1): θ is diffused to ``t_θ = t^(1/κ) ≥ t``, so
when the state is almost clean θ is still noisy. A parameter whose evidence lives in the
state's fine scales (a viscosity: the spectrum above the forcing scale, buried under noise a few
percent of the state's std) can only be read once those scales emerge from the noise; with one
clock θ is settled by then. κ = 1 is the single clock.
"""

from __future__ import annotations

import math

import torch


def _batch_view(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor broadcastable against ``x (B, ...)``: a scalar, or ``(B,)`` reshaped to
    ``(B, 1, ..., 1)``."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        return t
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be a scalar or of shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (x.dim() - 1)))


class VPSchedule:
    """The cosine variance-preserving schedule ``t -> (μ(t), σ(t))``.

    Plain object, not a module: its only state is ``eta``, which belongs in the run's config
    rather than in a checkpoint's tensors.
    """

    def __init__(self, eta: float = 1e-3, theta_lag: float = 1.0) -> None:
        """Args:
            eta: the noise floor ``η`` in ``(0, 1)``: ``σ(0) = η`` and ``μ(1) = η``.
            theta_lag: ``κ ≥ 1``; θ's diffusion time is ``t^(1/κ)`` (1: the state's).
        """
        if not (isinstance(eta, (int, float)) and 0.0 < float(eta) < 1.0):
            raise ValueError(f"eta must be a number in (0, 1), got {eta!r}")
        if isinstance(theta_lag, bool) or not (isinstance(theta_lag, (int, float))
                                                and 1.0 <= float(theta_lag) < math.inf):
            raise ValueError(f"theta_lag must be a finite number >= 1, got {theta_lag!r}")
        self.eta = float(eta)
        self.theta_lag = float(theta_lag)
        self._angle = math.acos(math.sqrt(self.eta))

    def __repr__(self) -> str:
        lag = f", theta_lag={self.theta_lag:g}" if self.theta_lag != 1.0 else ""
        return f"VPSchedule(eta={self.eta:g}{lag})"

    def mu(self, t: torch.Tensor | float) -> torch.Tensor:
        """Signal scale ``μ(t)``, same shape as ``t`` (any shape), decreasing from 1 to ``η``."""
        return torch.cos(self._angle * torch.as_tensor(t)) ** 2

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Noise scale ``σ(t) = √(1 − μ² + η²)``, same shape as ``t``, increasing from ``η`` to 1."""
        return torch.sqrt(1.0 - self.mu(t) ** 2 + self.eta**2)

    def mu_sigma(self, t: torch.Tensor | float, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``μ(t), σ(t)`` for ``t`` scalar or ``(B,)``, shaped to broadcast against ``x (B, ...)``."""
        t = _batch_view(t, x)
        return self.mu(t), self.sigma(t)

    def theta_time(self, t: torch.Tensor | float) -> torch.Tensor:
        """θ's diffusion time ``t^(1/κ)``, same shape as ``t``; ``t`` itself when ``κ = 1``."""
        t = torch.as_tensor(t)
        return t if self.theta_lag == 1.0 else t.clamp_min(0.0) ** (1.0 / self.theta_lag)

    def mu_sigma_theta(self, t: torch.Tensor | float, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """θ's ``μ, σ`` at state time ``t`` (scalar or ``(B,)``), broadcast against ``x (B, ...)``."""
        t = self.theta_time(_batch_view(t, x))
        return self.mu(t), self.sigma(t)

    def perturb_theta(self, x: torch.Tensor, t: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
        """θ diffused to state time ``t``: ``μ(t_θ) x + σ(t_θ) ε``, ``(B, ...)``."""
        mu, sigma = self.mu_sigma_theta(t, x)
        return mu * x + sigma * noise

    def perturb(self, x: torch.Tensor, t: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
        """Diffuse clean data to time ``t``.

        Args:
            x: clean data ``x_0``, ``(B, ...)``.
            t: diffusion times, scalar or ``(B,)``.
            noise: ``ε``, same shape as ``x``.

        Returns:
            ``x_t = μ(t) x + σ(t) ε``, ``(B, ...)``.
        """
        mu, sigma = self.mu_sigma(t, x)
        return mu * x + sigma * noise
