"""One analysis step for an augmented ensemble ``z = [state, u(θ)]``, whatever the method.

The cycling drivers (single-process twin experiments, MPI campaigns) forecast, observe and then
call :meth:`Analysis.__call__`; this module is where the three methods meet the state layout:

* ``z`` is ``(N, D + P)``: the flattened state of each member followed by the unconstrained
  transform ``u = T(θ)`` of its P estimated parameters;
* EnSF sees the likelihood score of the state part and zeros for θ; θ (and unobserved grid
  points) learn either from the prior score of the mixture estimator or from ensemble regression
  of the observed increments (``coupling="regression"``, EnSF-LR), or unobserved grid points
  from their nearby observed ones only (``coupling="local"``, θ still globally);
* LETKF treats θ as global columns (updated from all observations, no localization); the
  stochastic EnKF is global anyway;
* all randomness comes from per-member generators handed in by the caller, keyed by
  (seed, cycle, member, purpose), so a member's draws do not depend on batches or ranks.

Distributed analysis (:meth:`Analysis.run`, EnSF with the ``paired`` or ``gaussian``
estimator): a :class:`Layout` says which members (rows) this process holds and which whole
column blocks of ``COLUMN_CHUNK`` columns it holds in the *column layout* (every member, some
columns). The reverse SDE runs on the local members only (its particles interact only through
the column mean and variance); inflation statistics, the Gaussian prior's ``(m, v)``, the
regression's ``A Aᵀ`` and ``A δᵀ`` (one share per column block, summed in block order) and RTPS
are column-wise, computed in the column layout. Every column statistic uses the fixed-order sums
of :mod:`kernels.ensemble` and every GEMM has the same operands for any split, so the result is
bitwise the same for any number of processes. :class:`LocalLayout` is the one-process case;
an MPI layout lives in ``pipeline/`` (kernels know nothing of MPI).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from kernels.ensemble import member_mean, member_sum, member_var
from kernels.ensf import (
    EnSFSettings,
    ensf_analysis,
    inflate,
    regress_local,
    regress_unobserved,
    regression_apply,
    regression_partials,
    regression_weights,
    rtps,
)
from kernels.letkf import LocalObs, build_local_obs, enkf_stochastic, letkf_analysis
from kernels.observe import ObservationOperator

Method = Literal["ensf", "letkf", "enkf"]
Coupling = Literal["none", "regression", "local"]

#: columns per block of the column layout: the unit of ownership and of the regression's sums
COLUMN_CHUNK = 1 << 14


def block_range(total: int, parts: int, index: int) -> range:
    """Contiguous, balanced share ``index`` of ``range(total)`` split into ``parts``."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


def column_range(k: int, chunk: int, parts: int, index: int) -> range:
    """Columns of a ``(·, k)`` matrix held by process ``index`` of ``parts``: whole blocks of
    ``chunk`` columns (the last block may be short), contiguous and balanced by blocks."""
    blocks = block_range(-(-k // chunk), parts, index)
    return range(min(blocks.start * chunk, k), min(blocks.stop * chunk, k))


class Layout(Protocol):
    """Where the members (rows) and columns of an ensemble live in a distributed analysis.

    Attributes:
        n: all members N.
        members: the rows held here in the member layout.
        chunk: columns per block of the column layout.
    """

    n: int
    members: range
    chunk: int

    def columns(self, k: int) -> range:
        """Columns of a ``(·, k)`` matrix held here in the column layout."""
        ...

    def to_columns(self, x: torch.Tensor) -> torch.Tensor:
        """``(len(members), k) -> (n, len(columns(k)))``."""
        ...

    def to_members(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """``(n, len(columns(k))) -> (len(members), k)``."""
        ...

    def gather_columns(self, v: torch.Tensor, k: int) -> torch.Tensor:
        """``(..., len(columns(k))) -> (..., k)`` on every process."""
        ...

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``(len(members), ...) -> (n, ...)`` on every process."""
        ...

    def gather_blocks(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """One tensor per local column block -> the tensors of all blocks, in block order."""
        ...


@dataclass(frozen=True)
class LocalLayout:
    """One process holds everything: every collective is the identity."""

    n: int
    chunk: int = COLUMN_CHUNK

    @property
    def members(self) -> range:
        return range(self.n)

    def columns(self, k: int) -> range:
        return range(k)

    def to_columns(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def to_members(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return x

    def gather_columns(self, v: torch.Tensor, k: int) -> torch.Tensor:
        return v

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather_blocks(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        return parts


@dataclass
class Distributed:
    """Result of :meth:`Analysis.run`.

    Attributes:
        z: analysis of the local members ``(len(members), D + P)``.
        prior_columns: the forecast (before inflation) in the column layout ``(N, C)``.
        post_columns: the analysis in the column layout ``(N, C)``.
        columns: the global column indices ``C`` of the column layout held here.
    """

    z: torch.Tensor
    prior_columns: torch.Tensor
    post_columns: torch.Tensor
    columns: range


@dataclass(frozen=True)
class FilterSpec:
    """What analysis to run and its tuning.

    Attributes:
        method: ``"ensf"``, ``"letkf"`` or ``"enkf"`` (stochastic, perturbed observations).
        inflation: multiplicative inflation (≥ 1) of the forecast state anomalies before any
            analysis (θ columns are never inflated).
        rtps: relaxation to prior spread after the analysis, in [0, 1] (0 = off).
        radius: localization half-width in grid units: LETKF's (None = global ETKF), and the
            EnSF ``coupling="local"`` regression's (required there).
        ensf: EnSF settings.
        coupling: how EnSF informs θ and unobserved grid points: ``"regression"`` (ensemble
            regression on the observed increments) or ``"none"`` (only through the prior score,
            which is enough with the mixture estimator and gives nothing with the paired one),
            or ``"local"``: each unobserved grid point regressed on the observed ones within
            ``2 · radius`` (:func:`kernels.ensf.regress_local`), θ on all observed ones. For
            partially observed fields; the analysis then runs replicated (not distributable).
        ridge: relative ridge of the regression.
        column_chunk: columns per block of the distributed analysis' column layout (and of the
            regression's partial sums); the same value gives the same numbers on any number of
            processes.
    """

    method: Method = "ensf"
    inflation: float = 1.0
    rtps: float = 0.0
    radius: float | None = None
    ensf: EnSFSettings = field(default_factory=EnSFSettings)
    coupling: Coupling = "regression"
    ridge: float = 1e-3
    column_chunk: int = COLUMN_CHUNK

    def __post_init__(self) -> None:
        if self.method not in ("ensf", "letkf", "enkf"):
            raise ValueError(f"method must be ensf, letkf or enkf, got {self.method!r}")
        if not (self.inflation >= 1.0 and math.isfinite(self.inflation)):
            raise ValueError(f"inflation must be >= 1, got {self.inflation!r}")
        if not 0.0 <= self.rtps <= 1.0:
            raise ValueError(f"rtps must lie in [0, 1], got {self.rtps!r}")
        if self.radius is not None and not self.radius > 0:
            raise ValueError(f"radius must be positive or None, got {self.radius!r}")
        if self.coupling not in ("none", "regression", "local"):
            raise ValueError(f"coupling must be none, regression or local, got {self.coupling!r}")
        if self.method == "ensf" and self.coupling == "local" and self.radius is None:
            raise ValueError("coupling local needs a localization radius")
        if self.coupling == "local" and not self.ridge > 0:
            raise ValueError(f"coupling local needs ridge > 0, got {self.ridge!r}")
        if self.column_chunk < 1:
            raise ValueError(f"column_chunk must be >= 1, got {self.column_chunk!r}")


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
        self._coupling_local = None
        if spec.method == "ensf" and spec.coupling == "local":
            # fixed network: each unobserved grid point's observed neighbours and tapers, once
            locs = grid_locations(op)
            obs_cols = torch.nonzero(observed).squeeze(1)
            tgt_cols = torch.nonzero(~observed).squeeze(1)
            lo = build_local_obs(locs[tgt_cols], locs[obs_cols],
                                 torch.tensor(op.spatial_shape, dtype=torch.float64),
                                 float(spec.radius))
            self._coupling_local = (obs_cols, tgt_cols, lo)

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
        if self.distributable:
            return self.run(z, y, generators, LocalLayout(n, spec.column_chunk)).z
        prior = z
        if spec.inflation != 1.0:
            # inflate the state only: θ has no model error to compensate, and inflating it
            # every cycle with nothing to pull it back makes its spread grow without bound
            prior = torch.cat([inflate(z[:, : self.d], spec.inflation), z[:, self.d:]], dim=1)
        if spec.method == "ensf":
            post = ensf_analysis(prior, self._likelihood_grad(y), spec.ensf, generators)
            if spec.coupling == "regression":
                post = regress_unobserved(prior, post, self.observed.to(z.device), spec.ridge,
                                          chunk=spec.column_chunk)
            elif spec.coupling == "local" and self._coupling_local is not None:
                obs_cols, tgt_cols, lo = self._coupling_local
                if self.n_params:
                    # θ from every observed increment: the global regression on those columns only
                    cols = torch.cat([obs_cols, torch.arange(self.d, self.d + self.n_params)]).to(z.device)
                    sub = regress_unobserved(prior[:, cols], post[:, cols],
                                             self.observed.to(z.device)[cols], spec.ridge,
                                             chunk=spec.column_chunk)
                    post = post.clone()
                    post[:, self.d:] = sub[:, obs_cols.numel():]
                post = regress_local(prior, post, obs_cols, tgt_cols, lo.index, lo.weight,
                                     spec.ridge)
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

    @property
    def distributable(self) -> bool:
        """Whether :meth:`run` can analyse a slice of the members (EnSF, paired or gaussian)."""
        return (self.spec.method == "ensf" and self.spec.ensf.estimator in ("paired", "gaussian")
                and self.spec.coupling != "local")

    def run(self, z: torch.Tensor, y: torch.Tensor, generators: Sequence[torch.Generator],
            layout: Layout) -> Distributed:
        """Analyse the members held here; collectives through ``layout`` (see module doc).

        Every process of the layout must call this together. ``z`` holds the rows
        ``layout.members`` of the augmented forecast ``(N, D + P)``; ``generators`` are theirs.
        The same numbers come out for any layout with the same ``chunk``.
        """
        spec, k, d = self.spec, self.d + self.n_params, self.d
        if not self.distributable:
            raise ValueError(f"{spec.method}/{spec.ensf.estimator} needs every member in one place")
        if z.shape != (len(layout.members), k):
            raise ValueError(f"local ensemble is {tuple(z.shape)}; expected ({len(layout.members)}, {k})")
        cols = layout.columns(k)
        is_state = torch.arange(cols.start, cols.stop, device=z.device) < d
        zc = layout.to_columns(z)  # (N, C)
        prior_c, prior = zc, z
        if spec.inflation != 1.0:
            # state columns only (θ has no model error to compensate; see __call__)
            mean_c = member_mean(zc)
            prior_c = torch.where(is_state, inflate(zc, spec.inflation, mean_c), zc)
            mean = layout.gather_columns(mean_c, k)
            prior = torch.where(torch.arange(k, device=z.device) < d,
                                inflate(z, spec.inflation, mean), z)
        es = spec.ensf
        stats = None
        if es.estimator == "gaussian" or es.likelihood == "denoised":
            pm = member_mean(prior_c)
            pv = member_var(prior_c, pm, correction=1 if layout.n > 1 else 0)
            full = layout.gather_columns(torch.stack([pm, pv]), k)
            stats = (full[0], full[1])
        post = ensf_analysis(prior, self._likelihood_grad(y), es, generators, stats=stats)
        post_c = layout.to_columns(post)
        changed = False
        observed = self.observed.to(z.device)
        if spec.coupling == "regression" and bool(observed.any()) and not bool(observed.all()):
            post_c = self._regress(prior_c, post_c, observed[cols.start:cols.stop], layout, cols)
            changed = True
        if spec.rtps > 0:
            post_c = rtps(prior_c, post_c, spec.rtps)
            changed = True
        if changed:
            post = layout.to_members(post_c, k)
        return Distributed(post, zc, post_c, cols)

    def _regress(self, prior_c: torch.Tensor, post_c: torch.Tensor, observed_c: torch.Tensor,
                 layout: Layout, cols: range) -> torch.Tensor:
        """:func:`kernels.ensf.regress_unobserved` on the column layout: one ``(A Aᵀ, A δᵀ)``
        share per column block, gathered and summed in block order, the same on every process."""
        mean = member_mean(prior_c)
        spans = [slice(c, min(c + layout.chunk, len(cols))) for c in range(0, len(cols), layout.chunk)]
        mine = [torch.stack(regression_partials(prior_c[:, sp], post_c[:, sp], mean[sp],
                                                observed_c[sp])) for sp in spans]
        blocks = torch.stack(layout.gather_blocks(mine))  # (blocks, 2, N, N)
        gram, cross = member_sum(blocks).unbind(0)
        w = regression_weights(gram, cross, self.spec.ridge)
        out = post_c.clone()
        for sp in spans:
            regression_apply(prior_c[:, sp], out[:, sp], mean[sp], observed_c[sp], w)
        return out

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
