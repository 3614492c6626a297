"""One analysis step for an augmented ensemble ``z = [state, u(θ)]``, whatever the method.

The cycling drivers (single-process twin experiments, MPI campaigns) forecast, observe and then
call :meth:`Analysis.__call__`; this module is where the three methods meet the state layout:

* ``z`` is ``(N, D + P)``: the flattened state of each member followed by the unconstrained
  transform ``u = T(θ)`` of its P estimated parameters;
* EnSF sees the likelihood score of the state part and zeros for θ; θ (and unobserved grid
  points) learn either from the prior score of the mixture estimator or from ensemble regression
  of the observed increments (``coupling="regression"``, EnSF-LR);
* LETKF treats θ as global columns (updated from all observations, no localization); the
  stochastic EnKF is global anyway;
* all randomness comes from per-member generators handed in by the caller, keyed by
  (seed, cycle, member, purpose), so a member's draws do not depend on batches or ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from kernels.ensf import EnSFSettings, ensf_analysis, inflate, regress_unobserved, rtps
from kernels.letkf import LocalObs, build_local_obs, enkf_stochastic, letkf_analysis
from kernels.observe import ObservationOperator

Method = Literal["ensf", "letkf", "enkf"]
Coupling = Literal["none", "regression"]


@dataclass(frozen=True)
class FilterSpec:
    """What analysis to run and its tuning.

    Attributes:
        method: ``"ensf"``, ``"letkf"`` or ``"enkf"`` (stochastic, perturbed observations).
        inflation: multiplicative inflation (≥ 1) of the forecast state anomalies before any
            analysis (θ columns are never inflated).
        rtps: relaxation to prior spread after the analysis, in [0, 1] (0 = off).
        radius: LETKF localization half-width in grid units (None = global ETKF).
        ensf: EnSF settings.
        coupling: how EnSF informs θ and unobserved grid points: ``"regression"`` (ensemble
            regression on the observed increments) or ``"none"`` (only through the prior score,
            which is enough with the mixture estimator and gives nothing with the paired one).
        ridge: relative ridge of the regression.
    """

    method: Method = "ensf"
    inflation: float = 1.0
    rtps: float = 0.0
    radius: float | None = None
    ensf: EnSFSettings = field(default_factory=EnSFSettings)
    coupling: Coupling = "regression"
    ridge: float = 1e-3

    def __post_init__(self) -> None:
        if self.method not in ("ensf", "letkf", "enkf"):
            raise ValueError(f"method must be ensf, letkf or enkf, got {self.method!r}")
        if not (self.inflation >= 1.0 and math.isfinite(self.inflation)):
            raise ValueError(f"inflation must be >= 1, got {self.inflation!r}")
        if not 0.0 <= self.rtps <= 1.0:
            raise ValueError(f"rtps must lie in [0, 1], got {self.rtps!r}")
        if self.radius is not None and not self.radius > 0:
            raise ValueError(f"radius must be positive or None, got {self.radius!r}")
        if self.coupling not in ("none", "regression"):
            raise ValueError(f"coupling must be none or regression, got {self.coupling!r}")


def grid_locations(op: ObservationOperator) -> torch.Tensor:
    """Position of every state component in grid units, ``(D, k)`` float64, state order.

    Components on different variable channels at the same point share a position.
    """
    axes = [torch.arange(s, dtype=torch.float64) for s in op.spatial_shape]
    pts = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(axes))
    return pts.repeat(op.n_channels, 1)


class Analysis:
    """A reusable analysis for a fixed observation network.

    Args:
        op: observation operator on the model state.
        sigma: observation noise std (float or ``(m,)``).
        n_params: number of estimated parameters P appended to the state.
        spec: :class:`FilterSpec`.
    """

    def __init__(self, op: ObservationOperator, sigma: float | torch.Tensor, n_params: int,
                 spec: FilterSpec) -> None:
        self.op, self.sigma, self.n_params, self.spec = op, sigma, int(n_params), spec
        self.state_shape = op.state_shape
        self.d = math.prod(self.state_shape)
        observed = op.observed_mask().reshape(-1)
        self.observed = torch.cat([observed, torch.zeros(self.n_params, dtype=torch.bool)])
        self._local: LocalObs | None = None
        if spec.method == "letkf" and spec.radius is not None:
            # the observation network is fixed: find each point's local observations once
            self._local = build_local_obs(grid_locations(op), op.locations(),
                                          torch.tensor(op.spatial_shape, dtype=torch.float64),
                                          float(spec.radius))

    def __call__(self, z: torch.Tensor, y: torch.Tensor,
                 generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Analyse the augmented forecast ensemble.

        Args:
            z: forecast ``(N, D + P)``.
            y: observations ``(m,)``.
            generators: one CPU generator per member (EnSF noise, EnKF perturbations).

        Returns:
            analysis ensemble ``(N, D + P)``.
        """
        spec, n = self.spec, z.shape[0]
        if z.shape[1] != self.d + self.n_params:
            raise ValueError(f"ensemble has {z.shape[1]} columns; expected {self.d + self.n_params}")
        prior = z
        if spec.inflation != 1.0:
            # inflate the state only: θ has no model error to compensate, and inflating it
            # every cycle with nothing to pull it back makes its spread grow without bound
            prior = torch.cat([inflate(z[:, : self.d], spec.inflation), z[:, self.d:]], dim=1)
        if spec.method == "ensf":
            post = ensf_analysis(prior, self._likelihood_grad(y), spec.ensf, generators)
            if spec.coupling == "regression":
                post = regress_unobserved(prior, post, self.observed.to(z.device), spec.ridge)
        else:
            # H of the inflated members keeps the observed anomalies consistent (nonlinear H too)
            hx = self.op(prior[:, : self.d].reshape(n, *self.state_shape))
            if spec.method == "letkf":
                post = letkf_analysis(prior, hx, y, self.sigma, local_obs=self._local,
                                      global_columns=self.n_params or None)
            else:
                eps = torch.stack([torch.randn(self.op.m, generator=g, dtype=torch.float64)
                                   for g in generators]).to(z)
                post = enkf_stochastic(prior, hx, y, self.sigma, eps)
        if spec.rtps > 0:
            post = rtps(prior, post, spec.rtps)
        return post

    def _likelihood_grad(self, y: torch.Tensor):
        n_state, p = self.d, self.n_params

        def grad(zt: torch.Tensor) -> torch.Tensor:
            g = self.op.grad_log_likelihood(zt[:, :n_state].reshape(-1, *self.state_shape), y,
                                            self.sigma).reshape(zt.shape[0], n_state)
            return torch.cat([g, g.new_zeros(zt.shape[0], p)], dim=1) if p else g

        return grad


def roughen(u: torch.Tensor, std: float | torch.Tensor,
            generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Random-walk ("roughening") step of parameter particles in the unconstrained space.

    Args:
        u: ``(N, P)`` unconstrained parameters.
        std: step std, a float or ``(P,)``.
        generators: one CPU generator per member.

    Returns:
        ``(N, P)``; the draw of member i depends only on its own generator.
    """
    if u.shape[1] == 0:
        return u
    z = torch.stack([torch.randn(u.shape[1], generator=g, dtype=torch.float64) for g in generators])
    std_t = torch.as_tensor(std, dtype=torch.float64)
    return u + (std_t * z).to(u)
