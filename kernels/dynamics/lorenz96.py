"""Lorenz-96 on a ring of ``d`` variables, θ = forcing F, classical RK4.

    dx_i/dt = (x_{i+1} − x_{i−2}) x_{i−1} − x_i + F

Written with ``torch.roll`` over the last axis so one definition serves a single state, an
ensemble and a training batch. For very large ``d`` (up to 1e6 and beyond) the eager RK4 step
makes ~30 passes over memory; ``Lorenz96(compile=True)`` fuses the whole step with
``torch.compile`` into a few passes (one read and one write of the state at best).
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


_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}


def _compiled_step() -> Callable[..., torch.Tensor]:
    # One compiled graph per process; dynamic=False so inductor can specialise the index math
    # of the rolls, recompiling only for a new (B, d, dtype, device).
    if "step" not in _COMPILED:
        _COMPILED["step"] = torch.compile(l96_rk4_step, dynamic=False, fullgraph=True)
    return _COMPILED["step"]


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

    def __init__(self, size: int = 40, *, compile: bool = False) -> None:
        if int(size) != size or size < 4:
            raise ValueError(f"lorenz96 size must be an integer >= 4, got {size}")
        self.d = int(size)
        self.compile = compile

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
        if self.compile:
            return _compiled_step()(x, forcing, dt)
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
