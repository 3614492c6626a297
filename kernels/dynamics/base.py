"""The contract every dynamical model follows.

A model is a small object that knows its state shape, its named parameters θ (each with a
truth value, a prior and a transform to an unconstrained space) and how to advance a batch of
states, each member with its own θ, by one time step. Everything is batched over the leading
member axis so that one definition serves a single trajectory, an ensemble and a training batch;
a member's result never depends on which other members share the batch.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Transform = Literal["identity", "log"]


@dataclass(frozen=True)
class Param:
    """One model parameter.

    The prior is Gaussian in the unconstrained space: ``u ~ N(prior_loc, prior_scale²)`` with
    ``θ = exp(u)`` for ``transform="log"`` (a log-normal prior for positive parameters) and
    ``θ = u`` for ``transform="identity"``. Parameter particles live in that unconstrained space,
    where random-walk roughening cannot produce an invalid value.

    Attributes:
        name: identifier used in configs, CLI ``--param NAME=VALUE`` and stored datasets.
        truth: the default ("true") value in the natural space.
        prior_loc: prior mean in the unconstrained space.
        prior_scale: prior standard deviation in the unconstrained space.
        transform: ``"log"`` for strictly positive parameters, else ``"identity"``.
        units: CF-style units string.
        description: one line for docs and dataset attributes.
        lower, upper: admissible range in the natural space (checked by configs and the CLI).
    """

    name: str
    truth: float
    prior_loc: float
    prior_scale: float
    transform: Transform = "identity"
    units: str = "1"
    description: str = ""
    lower: float = -math.inf
    upper: float = math.inf

    def to_unconstrained(self, value: torch.Tensor) -> torch.Tensor:
        return torch.log(value) if self.transform == "log" else value

    def from_unconstrained(self, u: torch.Tensor) -> torch.Tensor:
        return torch.exp(u) if self.transform == "log" else u


class Dynamics(ABC):
    """A batched dynamical model ``x_{t+dt} = step(x_t, θ, dt)``.

    Subclasses set ``name``, ``params`` and ``default_dt`` and implement ``state_shape``,
    ``step`` and ``initial_state``. All tensors carry a leading member axis ``B``; θ is
    ``(B, P)`` in the natural (constrained) space, in the order of ``params``.
    """

    name: str = ""
    params: tuple[Param, ...] = ()
    default_dt: float = 0.01
    #: names of the state variables along the first state axis (e.g. ("v", "w")), or one name.
    variables: tuple[str, ...] = ("x",)
    #: physical units of the state, for stored datasets.
    state_units: str = "1"
    #: variables (indices into ``variables``) whose spatial mean is zero by construction in every
    #: state the model produces; a score network never sees that direction vary, and samplers
    #: pin it (:func:`kernels.score.sda.mean_projection`).
    mean_free: tuple[int, ...] = ()

    @property
    @abstractmethod
    def state_shape(self) -> tuple[int, ...]:
        """Shape of one member's state, without the member axis."""

    @property
    def state_dims(self) -> tuple[str, ...]:
        """Dimension names of one member's state, for labelled datasets."""
        return tuple(f"dim_{i}" for i in range(len(self.state_shape)))

    def state_coords(self) -> dict[str, torch.Tensor]:
        """Coordinate values along the state dims (physical positions where meaningful)."""
        return {d: torch.arange(s) for d, s in zip(self.state_dims, self.state_shape, strict=True)}

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"{self.name} has no parameter {name!r}; known: {', '.join(self.param_names)}")

    @abstractmethod
    def step(self, x: torch.Tensor, theta: torch.Tensor, dt: float | None = None) -> torch.Tensor:
        """Advance every member by one step.

        Args:
            x: states, ``(B, *state_shape)``.
            theta: parameters in the natural space, ``(B, P)``.
            dt: step size; ``default_dt`` when None.

        Returns:
            ``(B, *state_shape)``, same dtype and device as ``x``.
        """

    @abstractmethod
    def initial_state(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Random initial states ``(batch, *state_shape)`` drawn with ``generator``."""

    # ----------------------------------------------------------------------------------------
    # parameters
    def truth_theta(
        self,
        batch: int = 1,
        overrides: dict[str, float] | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """θ at its truth values (with optional overrides by name), ``(batch, P)``."""
        overrides = dict(overrides or {})
        unknown = set(overrides) - set(self.param_names)
        if unknown:
            raise KeyError(
                f"{self.name} has no parameter {sorted(unknown)[0]!r}; "
                f"known: {', '.join(self.param_names)}"
            )
        values = [overrides.get(p.name, p.truth) for p in self.params]
        return torch.tensor(values, dtype=dtype, device=device).expand(batch, -1).clone()

    def sample_prior(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """θ drawn from the prior, ``(batch, P)`` in the natural space."""
        loc = torch.tensor([p.prior_loc for p in self.params], dtype=torch.float64)
        scale = torch.tensor([p.prior_scale for p in self.params], dtype=torch.float64)
        z = torch.randn(batch, len(self.params), generator=generator, dtype=torch.float64)
        return self.from_unconstrained(loc + scale * z).to(dtype=dtype, device=device)

    def to_unconstrained(self, theta: torch.Tensor, index: Sequence[int] | None = None) -> torch.Tensor:
        """Map θ ``(..., P)`` to the unconstrained space; with ``index``, ``theta`` holds only the
        parameters ``index`` (the estimated ones), ``(..., len(index))``."""
        params = self.params if index is None else [self.params[j] for j in index]
        cols = [p.to_unconstrained(theta[..., k]) for k, p in enumerate(params)]
        return torch.stack(cols, dim=-1) if cols else theta

    def from_unconstrained(self, u: torch.Tensor, index: Sequence[int] | None = None) -> torch.Tensor:
        """Inverse of :meth:`to_unconstrained`, ``(..., P) -> (..., P)``; with ``index``, ``u``
        holds only the parameters ``index`` (the estimated ones), ``(..., len(index))``."""
        params = self.params if index is None else [self.params[j] for j in index]
        cols = [p.from_unconstrained(u[..., k]) for k, p in enumerate(params)]
        return torch.stack(cols, dim=-1) if cols else u

    # ----------------------------------------------------------------------------------------
    # integration helpers
    def rollout(
        self,
        x0: torch.Tensor,
        theta: torch.Tensor,
        steps: int,
        *,
        save_every: int = 1,
        dt: float | None = None,
        include_initial: bool = True,
        callback: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Integrate ``steps`` steps and keep every ``save_every``-th state.

        Args:
            x0: initial states ``(B, *state_shape)``.
            theta: ``(B, P)``.
            steps: number of steps; must be a multiple of ``save_every``.
            save_every: keep one state in this many.
            include_initial: whether ``x0`` is the first saved state.
            callback: called with the number of steps just taken (for progress bars).

        Returns:
            ``(B, T, *state_shape)`` with ``T = steps // save_every (+1 if include_initial)``.
        """
        if save_every < 1 or steps % save_every:
            raise ValueError(f"steps ({steps}) must be a positive multiple of save_every ({save_every})")
        frames: list[torch.Tensor] = [x0] if include_initial else []
        x = x0
        for _ in range(steps // save_every):
            for _ in range(save_every):
                x = self.step(x, theta, dt)
            frames.append(x)
            if callback is not None:
                callback(save_every)
        return torch.stack(frames, dim=1)

    def advance(
        self,
        x: torch.Tensor,
        theta: torch.Tensor,
        steps: int,
        dt: float | None = None,
        callback: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Integrate ``steps`` steps and return only the final state ``(B, *state_shape)``."""
        for _ in range(steps):
            x = self.step(x, theta, dt)
            if callback is not None:
                callback(1)
        return x

    def advance_refined(
        self,
        x: torch.Tensor,
        theta: torch.Tensor,
        steps: int,
        dt: float,
        level: torch.Tensor,
        max_level: int,
        bound: float = math.inf,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance by ``steps·dt``, halving a row's step where its integration fails.

        Row ``i`` is integrated at ``dt / 2**level[i]``. A row that fails (:meth:`unstable`, or
        ``|x| > bound`` anywhere) is redone from ``x`` at half its step, up to ``max_level``
        halvings. A row's result depends on its own state and θ only, so the numbers do not
        depend on which rows share the batch, and a row that never fails is integrated exactly
        as by :meth:`advance` at its level.

        Args:
            x: states ``(B, *state_shape)``.
            theta: parameters ``(B, P)``, natural space.
            steps: number of steps of ``dt`` (the interval is ``steps · dt``).
            dt: the unrefined step.
            level: ``(B,)`` int64, the halvings each row starts at (not modified).
            max_level: the most halvings a row may reach.
            bound: a finite state with a larger magnitude also counts as a failure.

        Returns:
            ``(y, level)``: ``y`` ``(B, *state_shape)`` and ``level`` ``(B,)`` int64, the
            halvings each row ended at. A row with ``level > max_level`` failed at every step
            tried; its ``y`` is the attempt at ``max_level``, for the caller to report.
        """
        level = level.clone()
        if not x.shape[0]:
            return x.clone(), level
        out: torch.Tensor | None = None
        todo = torch.arange(x.shape[0])
        while todo.numel():
            failed = []
            for lv in sorted(set(level[todo].tolist())):
                rows = todo[level[todo] == lv]
                whole = rows.numel() == x.shape[0]  # the common case: no gather, no scatter
                x0, th = (x, theta) if whole else (x[rows], theta[rows])
                y = self.advance(x0, th, steps << lv, dt / (1 << lv))
                bad = self.unstable(x0, y, steps * dt)
                if math.isfinite(bound):
                    bad = bad | (y.detach().abs().flatten(1).nan_to_num(0.0, posinf=math.inf)
                                 .amax(dim=1) > bound)
                bad = bad.cpu()
                if whole and not bool(bad.any()):
                    return y, level
                out = torch.empty_like(x) if out is None else out
                # the last attempt of a row that fails throughout is kept for the caller's report
                keep = ~bad if lv < max_level else torch.ones_like(bad)
                out[rows[keep]] = y[keep.to(y.device)]
                failed.append(rows[bad])
            todo = torch.cat(failed)
            level[todo] += 1
            todo = todo[level[todo] <= max_level]
        assert out is not None
        return out, level

    def unstable(self, before: torch.Tensor, after: torch.Tensor, elapsed: float) -> torch.Tensor:
        """Rows whose integration from ``before`` to ``after`` over time ``elapsed`` failed.

        Args:
            before: states at the start ``(B, *state_shape)``.
            after: states ``elapsed`` model time later ``(B, *state_shape)``.
            elapsed: the model time between them (> 0).

        Returns:
            ``(B,)`` bool: non-finite rows here; a model with a bound on how fast its state can
            grow also flags rows that exceed it (an explicit step past its stability limit grows
            without bound, often for a few steps before it overflows).
        """
        return ~torch.isfinite(after.flatten(1)).all(dim=1)


def theta_column(theta: torch.Tensor, index: int, ndim: int) -> torch.Tensor:
    """Column ``index`` of θ ``(B, P)`` shaped ``(B, 1, ..., 1)`` to broadcast over ``ndim`` state axes."""
    return theta[:, index].reshape(-1, *([1] * ndim))


def rk4(
    f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dt: float
) -> torch.Tensor:
    """One classical Runge–Kutta step of ``dx/dt = f(x)``."""
    k1 = f(x)
    k2 = f(x + (0.5 * dt) * k1)
    k3 = f(x + (0.5 * dt) * k2)
    k4 = f(x + dt * k3)
    return x + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


def check_batch(x: torch.Tensor, theta: torch.Tensor, state_shape: Sequence[int], n_params: int) -> None:
    """Raise a clear error when ``x`` / ``theta`` do not match the model's shapes."""
    if tuple(x.shape[1:]) != tuple(state_shape):
        want = ", ".join(map(str, state_shape))
        raise ValueError(f"state has shape {tuple(x.shape)}; expected (B, {want})")
    if theta.ndim != 2 or theta.shape[0] != x.shape[0] or theta.shape[1] != n_params:
        raise ValueError(f"theta has shape {tuple(theta.shape)}; expected ({x.shape[0]}, {n_params})")
