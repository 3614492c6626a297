"""Observation operators ``H``: states ``(B, *state_shape)`` -> observations ``(B, m)``.

Observations are ``y = H(x) + ε`` with independent Gaussian noise ``ε_j ~ N(0, σ_j²)``; σ is a
float (the same for every observation) or an ``(m,)`` tensor. The analysis methods need three
things from an operator, all provided here:

* EnSF needs the likelihood score ``∇_x log p(y | x)`` — :meth:`ObservationOperator.grad_log_likelihood`,
  analytic for the operators below (selection and pooling are linear with a cheap adjoint, the
  pointwise nonlinearities go through the chain rule) with an autograd fallback in the base class;
* LETKF / EnKF need ``H(x)`` of every member and where each observation sits —
  :meth:`~ObservationOperator.locations` in grid-index units of the state's spatial axes, plus the
  periodic extent :attr:`~ObservationOperator.spatial_shape` for distances on the torus;
* the SDA sampler differentiates through ``H`` with autograd; every operator is plain torch.

State layout. The trailing ``spatial_ndim`` axes of a state are spatial (a ring, or a periodic
``(y, x)`` grid); any single leading axis is a variable/channel axis (FitzHugh–Nagumo ``(2, n)``
holds ``(v, w)``). When ``spatial_ndim`` is not given it is inferred: ``(n,)`` is a ring, a square
``(n, n)`` is a 2-D grid, a non-square ``(C, n)`` is ``C`` variables on a ring and ``(C, n, n)`` is
``C`` variables on a grid. Pass ``spatial_ndim`` explicitly for anything else (e.g. a non-square
grid). Operators with ``channel=None`` observe every variable at each observed point, ordered
channel-major (all points of channel 0, then of channel 1, ...); ``channel=c`` observes only
variable ``c``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch

Sigma = float | torch.Tensor
NonlinearKind = Literal["arctan", "saturation"]

__all__ = [
    "ObservationOperator",
    "LinearOperator",
    "Selection",
    "Identity",
    "EveryKth",
    "RandomMask",
    "CoarsePool",
    "Nonlinear",
    "make_operator",
    "add_noise",
    "check_observations",
    "OPERATOR_KINDS",
    "NONLINEARITIES",
]


# ------------------------------------------------------------------------------------------------
# layout helpers
def _split_layout(
    state_shape: Sequence[int], spatial_ndim: int | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Split ``state_shape`` into (channel axes, spatial axes); at most one channel axis."""
    shape = tuple(int(s) for s in state_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"state_shape must be a non-empty tuple of positive sizes, got {shape}")
    if spatial_ndim is None:
        if len(shape) == 1:
            spatial_ndim = 1
        elif len(shape) == 2:
            spatial_ndim = 2 if shape[0] == shape[1] else 1
        elif len(shape) == 3:
            spatial_ndim = 2
        else:
            raise ValueError(f"cannot infer the spatial axes of state_shape {shape}; pass spatial_ndim")
    if spatial_ndim not in (1, 2) or spatial_ndim > len(shape) or len(shape) - spatial_ndim > 1:
        raise ValueError(
            f"spatial_ndim={spatial_ndim} does not fit state_shape {shape}: need 1 or 2 spatial "
            "axes and at most one leading channel axis"
        )
    return shape[: len(shape) - spatial_ndim], shape[len(shape) - spatial_ndim :]


def _check_channel(channel: int | None, channel_shape: tuple[int, ...]) -> int | None:
    if channel is None:
        return None
    if isinstance(channel, bool) or not isinstance(channel, int):
        raise ValueError(f"channel must be an int or None, got {channel!r}")
    n_channels = channel_shape[0] if channel_shape else 1
    if not channel_shape:
        raise ValueError("channel was given but the state has no channel axis")
    if not 0 <= channel < n_channels:
        raise ValueError(f"channel={channel} is out of range for {n_channels} channels")
    return channel


def _sigma_tensor(sigma: Sigma, m: int, like: torch.Tensor) -> torch.Tensor:
    """σ as a tensor broadcastable against ``(B, m)`` on ``like``'s dtype/device (shape checks only)."""
    if isinstance(sigma, torch.Tensor):
        if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape[0] not in (1, m)):
            raise ValueError(f"sigma has shape {tuple(sigma.shape)}; expected a scalar or ({m},)")
        return sigma.to(dtype=like.dtype, device=like.device)
    s = float(sigma)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"sigma must be positive and finite, got {s}")
    return torch.tensor(s, dtype=like.dtype, device=like.device)


def _check_y_shape(y: torch.Tensor, batch: int, m: int) -> None:
    if not (y.shape == (m,) or y.shape == (batch, m)):
        raise ValueError(f"observations y have shape {tuple(y.shape)}; expected ({m},) or ({batch}, {m})")


# ------------------------------------------------------------------------------------------------
# base classes
class ObservationOperator(ABC):
    """An observation operator ``H: (B, *state_shape) -> (B, m)`` with Gaussian-likelihood helpers.

    Subclasses implement :meth:`forward`, :meth:`locations` and :meth:`observed_mask` and set
    ``linear``; nonlinear ones may override :meth:`vjp` with an analytic form (the default uses
    autograd). Operators hold no per-batch state, so a member's observation never depends on
    which other members share the batch.
    """

    #: whether ``H`` is linear (then :meth:`adjoint` exists and ``vjp(x, r) = adjoint(r)``).
    linear: bool = False
    #: whether no two observations depend on the same state component (then ``H V Hᵀ`` of
    #: :meth:`white_covariance` is diagonal for any diagonal ``V``).
    disjoint_rows: bool = False

    def __init__(self, state_shape: Sequence[int], spatial_ndim: int | None = None) -> None:
        self._channel_shape, self._spatial_shape = _split_layout(state_shape, spatial_ndim)
        self._state_shape = self._channel_shape + self._spatial_shape

    # -- shapes --------------------------------------------------------------------------------
    @property
    def state_shape(self) -> tuple[int, ...]:
        """Shape of one member's state, without the member axis."""
        return self._state_shape

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Periodic extent of the spatial axes in grid units, e.g. ``(d,)`` or ``(n, n)``."""
        return self._spatial_shape

    @property
    def spatial_ndim(self) -> int:
        """Number of spatial axes ``k`` (the width of :meth:`locations`)."""
        return len(self._spatial_shape)

    @property
    def n_channels(self) -> int:
        """Size of the leading variable axis (1 when the state has none)."""
        return self._channel_shape[0] if self._channel_shape else 1

    @property
    @abstractmethod
    def m(self) -> int:
        """Number of observations."""

    # -- the operator --------------------------------------------------------------------------
    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``H(x)`` without shape checks; ``x (B, *state_shape) -> (B, m)``."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Apply ``H``.

        Args:
            x: states ``(B, *state_shape)``.

        Returns:
            observations ``(B, m)``, same dtype and device as ``x``; differentiable by autograd.
        """
        self._check_state(x)
        return self.forward(x)

    def vjp(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Vector–Jacobian product ``J_H(x)ᵀ r``.

        Generic autograd fallback; linear and pointwise-nonlinear operators override it.

        Args:
            x: states ``(B, *state_shape)``.
            r: cotangents ``(B, m)``.

        Returns:
            ``(B, *state_shape)``.
        """
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.forward(xg), xg, grad_outputs=r)
        return g

    @abstractmethod
    def locations(self) -> torch.Tensor:
        """Position of each observation, ``(m, k)`` float64 on CPU, in grid-index units.

        Columns follow the spatial axes of the state (``(y, x)`` for a 2-D grid); pooled
        observations sit at their block centre. Distances are periodic with period
        :attr:`spatial_shape`.
        """

    @abstractmethod
    def observed_mask(self) -> torch.Tensor:
        """``(*state_shape)`` bool (CPU): state components that at least one observation touches."""

    # -- Gaussian likelihood -------------------------------------------------------------------
    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor, sigma: Sigma) -> torch.Tensor:
        """``log p(y | x) = −½ Σ_j ((y_j − H(x)_j) / σ_j)²`` up to an additive constant.

        The dropped constant ``−Σ_j log(σ_j √(2π))`` does not depend on ``x``.

        Args:
            x: states ``(B, *state_shape)``.
            y: observations ``(m,)`` (shared by all members) or ``(B, m)``.
            sigma: noise std, a float or an ``(m,)`` tensor.

        Returns:
            ``(B,)``; differentiable with respect to ``x``.
        """
        hx = self(x)
        _check_y_shape(y, x.shape[0], self.m)
        s = _sigma_tensor(sigma, self.m, hx)
        return -0.5 * (((y.to(hx) - hx) / s) ** 2).sum(-1)

    def grad_log_likelihood(self, x: torch.Tensor, y: torch.Tensor, sigma: Sigma) -> torch.Tensor:
        """Likelihood score ``∇_x log p(y | x) = J_H(x)ᵀ (y − H(x)) / σ²``.

        Args:
            x: states ``(B, *state_shape)``.
            y: observations ``(m,)`` or ``(B, m)``.
            sigma: noise std, a float or an ``(m,)`` tensor.

        Returns:
            ``(B, *state_shape)``, same dtype and device as ``x``.
        """
        hx = self(x)
        _check_y_shape(y, x.shape[0], self.m)
        s = _sigma_tensor(sigma, self.m, hx)
        r = (y.to(hx) - hx) / (s * s)
        return self.vjp(x, r.expand(x.shape[0], self.m))

    # -- scale of a state perturbation in observation space ---------------------------------
    def white_variance(self, channel_var: torch.Tensor | float) -> torch.Tensor:
        """Variance of each observation of a white state perturbation: ``diag(H V Hᵀ)``.

        ``V`` is diagonal with ``channel_var[c]`` on every point of channel ``c``. This is the
        observation-space size of the SDA likelihood's ``γ (σ_t/μ_t)²`` term (a perturbation of
        variance ``(σ_t/μ_t)²`` per normalised state entry): point observations give the
        channel's variance, a block mean of ``f^k`` points ``1/f^k`` of it, a velocity the sum of
        its row's squared weights.

        Args:
            channel_var: per-channel variance ``(C,)`` or one float for every channel.

        Returns:
            ``(m,)`` float64 on the CPU. Linear operators: exact. A generic operator: its
            Jacobian at ``x = 0`` (from :meth:`vjp`), row by row.
        """
        var = self._channel_var(channel_var)
        return torch.cat([self._weighted_sq(rows, var) for rows in self._jacobian_rows()])

    def white_covariance(self, channel_var: torch.Tensor | float) -> torch.Tensor:
        """The full ``H V Hᵀ`` of :meth:`white_variance`, ``(m, m)`` float64 on the CPU.

        Its off-diagonal matters for operators whose rows overlap (a velocity from the inverse
        Laplacian sees every point): a large-scale perturbation then moves all observations
        together, with a variance along that pattern far above the diagonal's. Operators with
        :attr:`disjoint_rows` have a diagonal one; use :meth:`white_variance` for them (``m²``
        memory here).
        """
        var = self._channel_var(channel_var)
        n = math.prod(self._state_shape)
        r = torch.cat([rows.reshape(-1, n) for rows in self._jacobian_rows()])  # (m, n)
        return (r * var.repeat_interleave(n // self.n_channels)) @ r.T

    def _jacobian_rows(self) -> Iterator[torch.Tensor]:
        """Rows of ``J_H(0)`` as ``(k, *state_shape)`` float64 chunks of ~2^22 entries (bounded
        memory on any grid), from :meth:`vjp` of unit cotangents."""
        n = math.prod(self._state_shape)
        chunk = max(1, (1 << 22) // max(1, n))
        x0 = torch.zeros(1, *self._state_shape, dtype=torch.float64)
        for a in range(0, self.m, chunk):
            k = min(chunk, self.m - a)
            unit = torch.zeros(k, self.m, dtype=torch.float64)
            unit[torch.arange(k), a + torch.arange(k)] = 1.0
            yield self.vjp(x0.expand(k, *self._state_shape), unit)

    def _channel_var(self, channel_var: torch.Tensor | float) -> torch.Tensor:
        var = torch.as_tensor(channel_var, dtype=torch.float64).reshape(-1).cpu()
        if var.numel() == 1:
            var = var.expand(self.n_channels)
        if var.numel() != self.n_channels or not bool(torch.isfinite(var).all()) or bool((var < 0).any()):
            raise ValueError(f"channel_var must be {self.n_channels} finite values >= 0, "
                             f"got {tuple(var.shape)}")
        return var

    def _weighted_sq(self, rows: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """``Σ_j rows[i, j]² var[c(j)]`` for rows ``(k, *state_shape)`` -> ``(k,)``."""
        sq = rows.double().square().reshape(rows.shape[0], self.n_channels, -1).sum(-1)
        return sq @ var

    # -- helpers -------------------------------------------------------------------------------
    def _check_state(self, x: torch.Tensor) -> None:
        if x.ndim != len(self._state_shape) + 1 or tuple(x.shape[1:]) != self._state_shape:
            want = ", ".join(map(str, self._state_shape))
            raise ValueError(f"state has shape {tuple(x.shape)}; expected (B, {want})")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(state_shape={self.state_shape}, m={self.m})"


class LinearOperator(ObservationOperator):
    """A linear ``H`` with an explicit adjoint ``Hᵀ``; ``vjp(x, r) = Hᵀ r`` for any ``x``."""

    linear = True

    @abstractmethod
    def adjoint(self, r: torch.Tensor) -> torch.Tensor:
        """``Hᵀ r``: ``r (B, m) -> (B, *state_shape)``, same dtype and device as ``r``."""

    def vjp(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return self.adjoint(r)


# ------------------------------------------------------------------------------------------------
# selection operators
class Selection(LinearOperator):
    """Observe a fixed set of state components: ``H(x) = x.flatten(1)[:, index]``.

    Subclasses pass the observed spatial points (flat indices into the spatial grid, sorted);
    the class expands them over the observed channels. The flat index tensor is cached per
    device so repeated calls do not re-upload it.

    Args:
        state_shape: shape of one state.
        points: ``(p,)`` int64 flat indices into ``spatial_shape`` (C order), distinct.
        channel: observe only this variable of a multi-variable state; all when None.
        spatial_ndim: number of trailing spatial axes (inferred when None, see module docs).
    """

    disjoint_rows = True

    def __init__(
        self,
        state_shape: Sequence[int],
        points: torch.Tensor,
        channel: int | None = None,
        spatial_ndim: int | None = None,
    ) -> None:
        super().__init__(state_shape, spatial_ndim)
        self.channel = _check_channel(channel, self._channel_shape)
        points = torch.as_tensor(points, dtype=torch.int64).reshape(-1).cpu()
        n_points = math.prod(self._spatial_shape)
        if points.numel() == 0:
            raise ValueError("an observation operator needs at least one observed point")
        if int(points.min()) < 0 or int(points.max()) >= n_points:
            raise ValueError(f"observed point indices must lie in [0, {n_points})")
        if torch.unique(points).numel() != points.numel():
            raise ValueError("observed point indices must be distinct")
        self.points = points
        channels = range(self.n_channels) if self.channel is None else [self.channel]
        # channel-major: all points of the first observed channel, then the next, ...
        self._index = torch.cat([c * n_points + points for c in channels])
        self._index_cache: dict[torch.device, torch.Tensor] = {}

    @property
    def m(self) -> int:
        return int(self._index.numel())

    @property
    def index(self) -> torch.Tensor:
        """Flat indices ``(m,)`` (CPU int64) into ``x.flatten(1)`` of the observed components."""
        return self._index

    def _index_on(self, device: torch.device) -> torch.Tensor:
        idx = self._index_cache.get(device)
        if idx is None:
            idx = self._index_cache[device] = self._index.to(device)
        return idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1).index_select(1, self._index_on(x.device))

    def adjoint(self, r: torch.Tensor) -> torch.Tensor:
        """Scatter ``r (B, m)`` into zeros of shape ``(B, *state_shape)``."""
        out = r.new_zeros(r.shape[0], math.prod(self._state_shape))
        # index_copy (not in-place on r) keeps the adjoint differentiable; indices are distinct
        out = out.index_copy(1, self._index_on(r.device), r)
        return out.reshape(r.shape[0], *self._state_shape)

    def white_variance(self, channel_var: torch.Tensor | float) -> torch.Tensor:
        return self._channel_var(channel_var)[self._index // math.prod(self._spatial_shape)]

    def locations(self) -> torch.Tensor:
        coords = torch.unravel_index(self.points, self._spatial_shape)
        loc = torch.stack(coords, dim=-1).to(torch.float64)
        reps = self.n_channels if self.channel is None else 1
        return loc.repeat(reps, 1)

    def observed_mask(self) -> torch.Tensor:
        mask = torch.zeros(math.prod(self._state_shape), dtype=torch.bool)
        mask[self._index] = True
        return mask.reshape(self._state_shape)


class Identity(Selection):
    """Observe every component (or every point of one ``channel``)."""

    def __init__(
        self, state_shape: Sequence[int], channel: int | None = None, spatial_ndim: int | None = None
    ) -> None:
        _, spatial = _split_layout(state_shape, spatial_ndim)
        super().__init__(state_shape, torch.arange(math.prod(spatial)), channel, spatial_ndim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel is None:  # no gather needed; reshape keeps it a view where possible
            return x.reshape(x.shape[0], -1)
        return super().forward(x)


class EveryKth(Selection):
    """Observe every ``k``-th point along each spatial axis, starting at ``offset``.

    On a 2-D grid this is every ``k``-th row and column: ``ceil((n − offset)/k)²`` points.

    Args:
        state_shape: shape of one state.
        k: stride, ``>= 1``.
        offset: first observed index along each spatial axis, ``0 <= offset < k``.
        channel: observe only this variable (e.g. ``0`` = v for FitzHugh–Nagumo).
        spatial_ndim: number of trailing spatial axes (inferred when None).
    """

    def __init__(
        self,
        state_shape: Sequence[int],
        k: int,
        offset: int = 0,
        channel: int | None = None,
        spatial_ndim: int | None = None,
    ) -> None:
        _, spatial = _split_layout(state_shape, spatial_ndim)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < k:
            raise ValueError(f"offset must be an int in [0, k={k}), got {offset!r}")
        if offset >= min(spatial):
            raise ValueError(f"offset={offset} leaves no observed point on spatial shape {spatial}")
        self.k, self.offset = k, offset
        axes = [torch.arange(offset, n, k) for n in spatial]
        grids = torch.meshgrid(*axes, indexing="ij")
        points = torch.zeros_like(grids[0])
        for n, g in zip(spatial, grids, strict=True):  # loop over ≤ 2 axes, not over points
            points = points * n + g
        super().__init__(state_shape, points.reshape(-1), channel, spatial_ndim)


class RandomMask(Selection):
    """Observe a fixed random subset of spatial points, drawn once at construction.

    The subset is the first ``count`` entries of a CPU ``randperm`` from ``generator``, sorted,
    so the same generator state gives the same mask on every rank and device.

    Args:
        state_shape: shape of one state.
        count: number of observed points; exactly one of ``count`` / ``fraction``.
        fraction: share of spatial points in ``(0, 1]``; ``count = max(1, round(fraction · n))``.
        generator: a CPU ``torch.Generator`` (the global CPU RNG when None).
        channel: observe only this variable.
        spatial_ndim: number of trailing spatial axes (inferred when None).
    """

    def __init__(
        self,
        state_shape: Sequence[int],
        count: int | None = None,
        fraction: float | None = None,
        generator: torch.Generator | None = None,
        channel: int | None = None,
        spatial_ndim: int | None = None,
    ) -> None:
        _, spatial = _split_layout(state_shape, spatial_ndim)
        n_points = math.prod(spatial)
        if (count is None) == (fraction is None):
            raise ValueError("RandomMask needs exactly one of count or fraction")
        if fraction is not None:
            f = float(fraction)
            if not 0.0 < f <= 1.0:
                raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
            count = max(1, round(f * n_points))
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= n_points:
            raise ValueError(f"count must be an int in [1, {n_points}], got {count!r}")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("RandomMask needs a CPU generator so every device draws the same mask")
        points = torch.randperm(n_points, generator=generator)[:count].sort().values
        super().__init__(state_shape, points, channel, spatial_ndim)


# ------------------------------------------------------------------------------------------------
# pooling
class CoarsePool(LinearOperator):
    """Non-overlapping average pooling by ``factor`` along every spatial axis.

    A ring of ``n`` gives ``n/f`` observations per channel, an ``(n, n)`` grid ``(n/f)²``.
    Implemented as a reshape into blocks and a mean (no loops); the adjoint spreads ``r / f^k``
    uniformly over each block.

    Args:
        state_shape: shape of one state.
        factor: block edge, must divide every spatial size.
        channel: pool only this variable; all (channel-major) when None.
        spatial_ndim: number of trailing spatial axes (inferred when None).
    """

    disjoint_rows = True

    def __init__(
        self,
        state_shape: Sequence[int],
        factor: int,
        channel: int | None = None,
        spatial_ndim: int | None = None,
    ) -> None:
        super().__init__(state_shape, spatial_ndim)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be a positive int, got {factor!r}")
        if any(n % factor for n in self._spatial_shape):
            raise ValueError(f"factor={factor} does not divide the spatial shape {self._spatial_shape}")
        self.factor = factor
        self.channel = _check_channel(channel, self._channel_shape)
        self._coarse = tuple(n // factor for n in self._spatial_shape)
        self._n_obs_channels = self.n_channels if self.channel is None else 1

    @property
    def m(self) -> int:
        return self._n_obs_channels * math.prod(self._coarse)

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C', *spatial)`` view of the pooled channels."""
        b = x.shape[0]
        if not self._channel_shape:
            return x.reshape(b, 1, *self._spatial_shape)
        if self.channel is None:
            return x
        return x[:, self.channel : self.channel + 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f = x.shape[0], self.factor
        xc = self._channels(x)
        blocks: list[int] = []
        for nc in self._coarse:
            blocks += [nc, f]
        xb = xc.reshape(b, xc.shape[1], *blocks)
        block_axes = tuple(range(3, 3 + 2 * len(self._coarse), 2))  # the f-sized axes
        return xb.mean(dim=block_axes).reshape(b, -1)

    def adjoint(self, r: torch.Tensor) -> torch.Tensor:
        b, f, k = r.shape[0], self.factor, len(self._coarse)
        rc = (r / f**k).reshape(b, self._n_obs_channels, *self._coarse)
        shape: list[int] = []
        expand: list[int] = []
        for nc in self._coarse:
            shape += [nc, 1]
            expand += [nc, f]
        spread = rc.reshape(b, self._n_obs_channels, *shape).expand(b, self._n_obs_channels, *expand)
        spread = spread.reshape(b, self._n_obs_channels, *self._spatial_shape)
        if not self._channel_shape:
            return spread.reshape(b, *self._spatial_shape)
        if self.channel is None:
            return spread.contiguous()
        out = r.new_zeros(b, *self._state_shape)
        out[:, self.channel : self.channel + 1] = spread
        return out

    def white_variance(self, channel_var: torch.Tensor | float) -> torch.Tensor:
        var = self._channel_var(channel_var)
        var = var if self.channel is None else var[self.channel : self.channel + 1]
        per_block = var / self.factor ** len(self._coarse)  # f^k points of weight 1/f^k
        return per_block.repeat_interleave(math.prod(self._coarse))

    def locations(self) -> torch.Tensor:
        f = self.factor
        centres = [torch.arange(nc, dtype=torch.float64) * f + (f - 1) / 2 for nc in self._coarse]
        grids = torch.meshgrid(*centres, indexing="ij")
        loc = torch.stack([g.reshape(-1) for g in grids], dim=-1)
        return loc.repeat(self._n_obs_channels, 1)

    def observed_mask(self) -> torch.Tensor:
        mask = torch.zeros(self._state_shape, dtype=torch.bool)
        if self.channel is None:
            mask[...] = True
        else:
            mask[self.channel] = True
        return mask


class CoarseVelocity(LinearOperator):
    """Velocity ``(u, v)`` of a 2-D periodic vorticity field, pooled by ``factor``.

    For a state that is the vorticity ``ω`` on an ``n × n`` periodic square (the Kolmogorov
    flow): ``u = ∂ψ/∂y``, ``v = −∂ψ/∂x`` with ``∇²ψ = −ω`` (the flow model's own spectral
    inversion, :meth:`kernels.dynamics.kolmogorov.Kolmogorov.velocity`), then block means of
    ``factor²`` points: ``2 (n/f)²`` observations, all of u before all of v. The velocity map is
    a real circulant with an odd imaginary symbol (``i k_y/|k|²``, ``−i k_x/|k|²``), so its
    transpose is its negative and the adjoint costs one more velocity inversion.

    Args:
        state_shape: ``(n, n)``.
        factor: block edge, must divide ``n``.
        domain: side of the periodic square (the model's, ``2π`` by default).
    """

    def __init__(self, state_shape: Sequence[int], factor: int, domain: float = 2 * math.pi) -> None:
        from kernels.dynamics.kolmogorov import Kolmogorov

        super().__init__(state_shape, spatial_ndim=2)
        n = self._spatial_shape
        if self._channel_shape or n[0] != n[1]:
            raise ValueError("coarse_velocity needs a square vorticity field (n, n), "
                             f"got {tuple(state_shape)}")
        self._flow = Kolmogorov(n[0], forcing_amplitude=0.0, domain=float(domain))
        self._pool = CoarsePool((2, *n), factor)

    @property
    def m(self) -> int:
        return self._pool.m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self._flow.velocity(x)
        return self._pool.forward(torch.stack([u, v], dim=1))

    def adjoint(self, r: torch.Tensor) -> torch.Tensor:
        ruv = self._pool.adjoint(r)  # (B, 2, n, n)
        return -(self._flow.velocity(ruv[:, 0])[0] + self._flow.velocity(ruv[:, 1])[1])

    def white_variance(self, channel_var: torch.Tensor | float) -> torch.Tensor:
        # the map commutes with shifts by whole blocks: every u row has the norm of the first u
        # row, every v row that of the first v row — two adjoints instead of m
        var = self._channel_var(channel_var)
        per = self.m // 2
        eye = torch.zeros(2, self.m, dtype=torch.float64)
        eye[0, 0] = eye[1, per] = 1.0
        uv = self._weighted_sq(self.adjoint(eye), var)
        return uv.repeat_interleave(per)

    def locations(self) -> torch.Tensor:
        return self._pool.locations()

    def observed_mask(self) -> torch.Tensor:
        # every vorticity point moves the velocity everywhere (the inverse Laplacian is global)
        return torch.ones(self._state_shape, dtype=torch.bool)


# ------------------------------------------------------------------------------------------------
# pointwise nonlinearities
def _apply(kind: str, z: torch.Tensor) -> torch.Tensor:
    return torch.atan(z) if kind == "arctan" else z / (1 + z.abs())


def _derivative(kind: str, z: torch.Tensor) -> torch.Tensor:
    # d/dz arctan z = 1/(1+z²);  d/dz z/(1+|z|) = 1/(1+|z|)²
    if kind == "arctan":
        return 1 / (1 + z * z)
    return 1 / (1 + z.abs()) ** 2


class Nonlinear(ObservationOperator):
    """A pointwise nonlinearity applied to another operator's output: ``H(x) = g(H_base(x))``.

    ``g`` is ``arctan`` or the saturation ``z / (1 + |z|)``; both are bounded, so large values
    are observed with little sensitivity. The likelihood score uses the chain rule
    ``J_Hᵀ r = J_baseᵀ (g'(H_base(x)) · r)``.

    Args:
        base: the inner operator (e.g. ``Identity`` for "arctan of every variable").
        kind: ``"arctan"`` or ``"saturation"``.
    """

    linear = False

    def __init__(self, base: ObservationOperator, kind: NonlinearKind) -> None:
        if kind not in NONLINEARITIES:
            raise ValueError(f"unknown nonlinearity {kind!r}; expected one of {', '.join(NONLINEARITIES)}")
        if not isinstance(base, ObservationOperator):
            raise ValueError(f"base must be an ObservationOperator, got {type(base).__name__}")
        self.base = base
        self.kind = kind
        self.disjoint_rows = base.disjoint_rows
        self._channel_shape = base._channel_shape
        self._spatial_shape = base._spatial_shape
        self._state_shape = base.state_shape

    @classmethod
    def arctan(cls, base: ObservationOperator) -> Nonlinear:
        """``arctan(H_base(x))``."""
        return cls(base, "arctan")

    @classmethod
    def saturation(cls, base: ObservationOperator) -> Nonlinear:
        """``H_base(x) / (1 + |H_base(x)|)``."""
        return cls(base, "saturation")

    @property
    def m(self) -> int:
        return self.base.m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _apply(self.kind, self.base.forward(x))

    def vjp(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        z = self.base.forward(x)
        return self.base.vjp(x, _derivative(self.kind, z) * r)

    def white_variance(self, channel_var: torch.Tensor | float) -> torch.Tensor:
        """The inner operator's: ``g'`` is at most 1 and equals 1 where ``H_base(x) = 0``; the
        SDA likelihood that uses this scales an approximate variance, not an exact one."""
        return self.base.white_variance(channel_var)

    def white_covariance(self, channel_var: torch.Tensor | float) -> torch.Tensor:
        """The inner operator's (as :meth:`white_variance`)."""
        return self.base.white_covariance(channel_var)

    def locations(self) -> torch.Tensor:
        return self.base.locations()

    def observed_mask(self) -> torch.Tensor:
        return self.base.observed_mask()

    def __repr__(self) -> str:
        return f"Nonlinear({self.base!r}, {self.kind!r})"


# ------------------------------------------------------------------------------------------------
# factory
OPERATOR_KINDS: tuple[str, ...] = ("identity", "every_kth", "random_mask", "coarse_pool", "coarse_velocity")
NONLINEARITIES: tuple[str, ...] = ("arctan", "saturation")

_OPTIONS: dict[str, tuple[str, ...]] = {
    "identity": ("channel",),
    "every_kth": ("k", "offset", "channel"),
    "random_mask": ("count", "fraction", "seed", "generator", "channel"),
    "coarse_pool": ("factor", "channel"),
    "coarse_velocity": ("factor", "domain"),
}
_REQUIRED: dict[str, tuple[str, ...]] = {"every_kth": ("k",), "coarse_pool": ("factor",),
                                         "coarse_velocity": ("factor",)}
_COMMON = ("nonlinearity", "spatial_ndim")


def make_operator(kind: str, state_shape: Sequence[int], **options: Any) -> ObservationOperator:
    """Build an operator from a config-style description.

    Args:
        kind: one of ``"identity"``, ``"every_kth"``, ``"random_mask"``, ``"coarse_pool"``,
            ``"coarse_velocity"``.
        state_shape: shape of one state.
        **options: per kind — identity: ``channel``; every_kth: ``k`` (required), ``offset``,
            ``channel``; random_mask: ``count`` or ``fraction``, ``seed`` (int) or ``generator``,
            ``channel``; coarse_pool: ``factor`` (required), ``channel``; coarse_velocity (a 2-D
            periodic vorticity state): ``factor`` (required), ``domain``. Every kind also takes
            ``nonlinearity`` (None, ``"arctan"``, ``"saturation"``) and ``spatial_ndim``.

    Returns:
        the operator, wrapped in :class:`Nonlinear` when a nonlinearity is given.

    Raises:
        ValueError: unknown kind, unknown or missing option, or an invalid option value.
    """
    if kind not in _OPTIONS:
        raise ValueError(
            f"unknown observation operator kind {kind!r}; expected one of {', '.join(OPERATOR_KINDS)}"
        )
    allowed = _OPTIONS[kind] + _COMMON
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option {unknown[0]!r} for observation operator {kind!r}; allowed: {', '.join(allowed)}"
        )
    missing = [name for name in _REQUIRED.get(kind, ()) if options.get(name) is None]
    if missing:
        raise ValueError(f"observation operator {kind!r} needs option {missing[0]!r}")
    opts = dict(options)
    nonlinearity = opts.pop("nonlinearity", None)
    if nonlinearity is not None and nonlinearity not in NONLINEARITIES:
        raise ValueError(
            f"option 'nonlinearity' must be None or one of {', '.join(NONLINEARITIES)}, got {nonlinearity!r}"
        )
    spatial_ndim = opts.pop("spatial_ndim", None)
    channel = opts.pop("channel", None)

    op: ObservationOperator
    if kind == "identity":
        op = Identity(state_shape, channel=channel, spatial_ndim=spatial_ndim)
    elif kind == "every_kth":
        op = EveryKth(state_shape, opts["k"], opts.get("offset", 0), channel, spatial_ndim)
    elif kind == "random_mask":
        seed, generator = opts.get("seed"), opts.get("generator")
        if seed is not None and generator is not None:
            raise ValueError("random_mask takes option 'seed' or 'generator', not both")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ValueError(f"option 'seed' must be an int, got {seed!r}")
            generator = torch.Generator().manual_seed(seed)
        op = RandomMask(
            state_shape, opts.get("count"), opts.get("fraction"), generator, channel, spatial_ndim
        )
    elif kind == "coarse_pool":
        op = CoarsePool(state_shape, opts["factor"], channel, spatial_ndim)
    else:
        op = CoarseVelocity(state_shape, opts["factor"], opts.get("domain", 2 * math.pi))
    return op if nonlinearity is None else Nonlinear(op, nonlinearity)


# ------------------------------------------------------------------------------------------------
# noise and validation
def add_noise(y_clean: torch.Tensor, sigma: Sigma, generator: torch.Generator | None = None) -> torch.Tensor:
    """``y = y_clean + σ ε`` with ``ε ~ N(0, I)``.

    ε is drawn on the CPU in float64 from ``generator`` and then cast and moved to ``y_clean``'s
    dtype and device, so CPU and CUDA runs with the same generator get the same noise.

    Args:
        y_clean: noise-free observations ``(..., m)``.
        sigma: noise std, a positive float or an ``(m,)`` tensor.
        generator: a CPU ``torch.Generator`` (the global CPU RNG when None).

    Returns:
        noisy observations, same shape, dtype and device as ``y_clean``.
    """
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("add_noise needs a CPU generator so that CPU and CUDA draw the same noise")
    m = y_clean.shape[-1] if y_clean.ndim else 1
    _check_sigma(sigma, m)
    s = sigma.detach().to("cpu", torch.float64) if isinstance(sigma, torch.Tensor) else float(sigma)
    eps = torch.randn(tuple(y_clean.shape), generator=generator, dtype=torch.float64)
    return y_clean + (s * eps).to(dtype=y_clean.dtype, device=y_clean.device)


def _check_sigma(sigma: Sigma, m: int) -> None:
    if isinstance(sigma, torch.Tensor):
        if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape[0] not in (1, m)):
            raise ValueError(f"sigma has shape {tuple(sigma.shape)}; expected a scalar or ({m},)")
        if not bool(torch.isfinite(sigma).all()):
            raise ValueError("sigma contains NaN or inf")
        if not bool((sigma > 0).all()):
            raise ValueError(f"sigma must be positive; smallest value is {float(sigma.min())}")
        return
    try:
        s = float(sigma)
    except (TypeError, ValueError):
        raise ValueError(f"sigma must be a float or a tensor, got {sigma!r}") from None
    if not math.isfinite(s):
        raise ValueError(f"sigma must be finite, got {s}")
    if s <= 0:
        raise ValueError(f"sigma must be positive, got {s}")


def check_observations(y: torch.Tensor, m: int, sigma: Sigma) -> None:
    """Validate observations and their noise level, raising a one-line ValueError on failure.

    Args:
        y: observations ``(m,)`` or ``(B, m)``.
        m: number of observations the operator produces.
        sigma: noise std, a float or a scalar / ``(m,)`` tensor; must be positive and finite.

    Raises:
        ValueError: wrong shape, NaN/inf in ``y``, or σ ≤ 0 / non-finite / wrongly shaped.
    """
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"observations must be a tensor, got {type(y).__name__}")
    if y.ndim not in (1, 2) or y.shape[-1] != m:
        raise ValueError(f"observations have shape {tuple(y.shape)}; expected ({m},) or (B, {m})")
    if not y.is_floating_point():
        raise ValueError(f"observations must be floating point, got {y.dtype}")
    finite = torch.isfinite(y)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"observations contain {bad} NaN or inf value(s)")
    _check_sigma(sigma, m)
