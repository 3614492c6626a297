"""Lorenz-96 on a ring of ``d`` variables, θ = forcing F, classical RK4.

    dx_i/dt = (x_{i+1} − x_{i−2}) x_{i−1} − x_i + F

Written with ``torch.roll`` over the last axis so one definition serves a single state, an
ensemble and a training batch. For very large ``d`` (up to 1e6 and beyond) the eager RK4 step
makes ~30 passes over memory. ``Lorenz96(compile=True)`` instead cuts the ring into tiles that
fit in cache, each with the 8 + 4 halo points that four RK stages need, and runs all four stages
of a tile in one ``torch.compile``-fused function: the state is then read and written about
once per step (measured in ``scoreda bench models``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels.dynamics.base import Dynamics, Param, check_batch, rk4


def l96_tendency(x: torch.Tensor, forcing: torch.Tensor) -> torch.Tensor:
    """Lorenz-96 time derivative.

    Args:
        x: states ``(B, d)``.
        forcing: per-member forcing ``(B, 1)``.

    Returns:
        ``(B, d)``.
    """
    return (torch.roll(x, -1, -1) - torch.roll(x, 2, -1)) * torch.roll(x, 1, -1) - x + forcing


def l96_rk4_step(x: torch.Tensor, forcing: torch.Tensor, dt: float) -> torch.Tensor:
    """One RK4 step of Lorenz-96; ``x (B, d)``, ``forcing (B, 1)``."""
    return rk4(lambda y: l96_tendency(y, forcing), x, dt)


# Halo of a tile: each RK stage reads 2 points to the left and 1 to the right of its output.
_HALO_L, _HALO_R = 8, 4


def _tendency_open(ye: torch.Tensor, forcing: torch.Tensor) -> torch.Tensor:
    """Tendency on an open segment ``ye (B, L)``: valid for ``ye[..., 2:-1]``, ``(B, L - 3)``."""
    return (ye[..., 3:] - ye[..., :-3]) * ye[..., 1:-2] - ye[..., 2:-1] + forcing


def l96_rk4_tile(xe: torch.Tensor, forcing: torch.Tensor, dt: float) -> torch.Tensor:
    """RK4 step of one tile with halos: ``xe (B, c + 12) -> (B, c)``.

    Plain slices instead of ``torch.roll`` keep the loads contiguous, so the compiled code
    vectorises (the modulo index math of a compiled roll does not: 3× slower, measured).
    """
    k1 = _tendency_open(xe, forcing)                                  # xe[2:-1]
    k2 = _tendency_open(xe[..., 2:-1] + (0.5 * dt) * k1, forcing)     # xe[4:-2]
    k3 = _tendency_open(xe[..., 4:-2] + (0.5 * dt) * k2, forcing)     # xe[6:-3]
    k4 = _tendency_open(xe[..., 6:-3] + dt * k3, forcing)             # xe[8:-4]
    return xe[..., 8:-4] + (dt / 6.0) * (
        k1[..., 6:-3] + 2.0 * k2[..., 4:-2] + 2.0 * k3[..., 2:-1] + k4
    )


def l96_rk4_tile_into(xe: torch.Tensor, forcing: torch.Tensor, dt: float, out: torch.Tensor) -> None:
    """:func:`l96_rk4_tile` written into ``out (B, c)``; compiled, the result is stored directly
    into the output view instead of through a temporary (about 12% faster, measured)."""
    out.copy_(l96_rk4_tile(xe, forcing, dt))


_COMPILED: dict[str, Callable[..., None]] = {}


def _compiled_tile() -> Callable[..., None]:
    # One compiled function per process; dynamic=False lets inductor specialise on the tile
    # shape, so it recompiles only for a new (B, tile, dtype, device).
    if "tile" not in _COMPILED:
        _COMPILED["tile"] = torch.compile(l96_rk4_tile_into, dynamic=False, fullgraph=True)
    return _COMPILED["tile"]


def l96_rk4_step_tiled(
    x: torch.Tensor, forcing: torch.Tensor, dt: float, tile: int = 25_000,
    fn: Callable[..., None] = l96_rk4_tile_into,
) -> torch.Tensor:
    """RK4 step of ``x (B, d)`` tile by tile (cache blocking); equals :func:`l96_rk4_step`.

    Tiles are near-equal (at most two distinct lengths, so at most two compilations); interior
    tiles are views of ``x`` with their halos, only the two tiles at the ring's seam are copied.
    """
    d = x.shape[-1]
    n_tiles = max(1, round(d / tile))
    bounds = [d * i // n_tiles for i in range(n_tiles + 1)]
    out = torch.empty_like(x)
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        if s - _HALO_L >= 0 and e + _HALO_R <= d:
            xe = x[..., s - _HALO_L:e + _HALO_R]
        else:
            idx = torch.arange(s - _HALO_L, e + _HALO_R, device=x.device) % d
            xe = x[..., idx]
        fn(xe, forcing, dt, out[..., s:e])
    return out


class Lorenz96(Dynamics):
    """Lorenz-96 with ``size`` variables (``size >= 4``)."""

    name = "lorenz96"
    params = (
        Param(
            "F",
            truth=8.0,
            prior_loc=8.0,
            prior_scale=2.0,
            transform="identity",
            units="1",
            description="external forcing (chaotic for F above about 5)",
            lower=-50.0,
            upper=50.0,
        ),
    )
    default_dt = 0.05
    variables = ("x",)
    state_units = "1"

    def __init__(self, size: int = 40, *, compile: bool = False, tile: int = 25_000) -> None:
        """Build the ring.

        Args:
            size: number of variables ``d`` (>= 4).
            compile: use the cache-blocked ``torch.compile`` step (worth it for large ``d``;
                the first step of a new shape pays the compilation, ~10 s).
            tile: ring points per tile of the compiled step (a tile of all members should fit
                in L2/L3: 25 000 × 20 members × 4 bytes ≈ 2 MB).
        """
        if isinstance(size, bool) or int(size) != size or size < 4:
            raise ValueError(f"lorenz96 size must be an integer >= 4, got {size}")
        if isinstance(tile, bool) or int(tile) != tile or tile < 16:
            raise ValueError(f"lorenz96 tile must be an integer >= 16, got {tile}")
        self.d = int(size)
        self.compile = bool(compile)
        self.tile = int(tile)

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.d,)

    @property
    def state_dims(self) -> tuple[str, ...]:
        return ("site",)

    def tendency(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """``dx/dt`` for ``x (B, d)`` and ``theta (B, 1)``."""
        return l96_tendency(x, theta[:, :1].to(x.dtype))

    def tendency_jvp(self, x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        """Tangent-linear tendency: the Jacobian of ``tendency`` at ``x`` applied to ``dx``.

        Args:
            x, dx: ``(B, d)``.

        Returns:
            ``(B, d)``; independent of F because the forcing enters additively.
        """
        r = torch.roll
        return ((r(dx, -1, -1) - r(dx, 2, -1)) * r(x, 1, -1)
                + (r(x, -1, -1) - r(x, 2, -1)) * r(dx, 1, -1) - dx)

    def step(self, x: torch.Tensor, theta: torch.Tensor, dt: float | None = None) -> torch.Tensor:
        check_batch(x, theta, self.state_shape, 1)
        dt = self.default_dt if dt is None else float(dt)
        forcing = theta[:, :1].to(x.dtype)
        if self.compile and self.d >= 2 * _HALO_L:
            return l96_rk4_step_tiled(x, forcing, dt, self.tile, _compiled_tile())
        return l96_rk4_step(x, forcing, dt)

    def initial_state(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """The usual start near the fixed point x = F: F plus N(0, 1) perturbations, ``(B, d)``.

        Drawn on the CPU in float64 so that CPU and CUDA runs start from identical states.
        """
        x = self.params[0].truth + torch.randn(batch, self.d, generator=generator, dtype=torch.float64)
        return x.to(dtype=dtype, device=device)
