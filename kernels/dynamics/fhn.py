"""A ring of diffusively coupled FitzHugh–Nagumo neurons.

Each of ``n`` neurons has a fast voltage-like variable ``v`` and a slow recovery variable ``w``;
neighbours on the ring are coupled through a discrete Laplacian in ``v``::

    dv_i/dt = v_i − v_i³/3 − w_i + I_ext + D (v_{i+1} − 2 v_i + v_{i−1})
    dw_i/dt = (v_i + a − b w_i) / τ

The state of one member is ``(2, n)``: channel 0 is ``v``, channel 1 is ``w``. θ = (a, b, τ, I_ext);
the truth values put the single neuron in its oscillatory (limit-cycle) regime.
"""

from __future__ import annotations

import math

import torch

from .base import Dynamics, Param, check_batch, rk4, theta_column

__all__ = ["FitzHughNagumo"]

# Column indices of θ, in the order of ``FitzHughNagumo.params``.
_A, _B, _TAU, _I = 0, 1, 2, 3


class FitzHughNagumo(Dynamics):
    """FitzHugh–Nagumo neurons on a ring with diffusive ``v`` coupling, integrated with RK4.

    Attributes:
        size: number of neurons ``n`` on the ring.
        coupling: diffusion coefficient ``D`` (≥ 0) of the ``v`` Laplacian.
    """

    name = "fhn"
    variables = ("v", "w")
    default_dt = 0.1
    params = (
        Param("a", 0.7, math.log(0.7), 0.2, "log", description="recovery offset a", lower=0.0),
        Param("b", 0.8, math.log(0.8), 0.2, "log", description="recovery damping b", lower=0.0),
        Param("tau", 12.5, math.log(12.5), 0.2, "log",
              description="time-scale ratio τ of the slow recovery variable", lower=0.0),
        Param("I_ext", 0.5, 0.5, 0.2, "identity", description="external input current I_ext"),
    )

    def __init__(self, size: int = 64, *, coupling: float = 0.1) -> None:
        """Build the ring.

        Args:
            size: number of neurons, at least 3 (so that both ring neighbours are distinct).
            coupling: diffusion coefficient ``D``; finite and non-negative.

        Raises:
            ValueError: for a size below 3 or a negative / non-finite coupling.
        """
        if isinstance(size, bool) or not isinstance(size, int) or size < 3:
            raise ValueError(f"FitzHughNagumo size must be an integer >= 3, got {size!r}")
        coupling = float(coupling)
        if not math.isfinite(coupling) or coupling < 0.0:
            raise ValueError(f"FitzHughNagumo coupling must be finite and >= 0, got {coupling!r}")
        self.size = size
        self.coupling = coupling

    def __repr__(self) -> str:
        return f"FitzHughNagumo(size={self.size}, coupling={self.coupling})"

    # ----------------------------------------------------------------------------------------
    # shapes and coordinates
    @property
    def state_shape(self) -> tuple[int, int]:
        """``(2, n)``: the variable axis (v, w) and the neuron axis."""
        return (2, self.size)

    @property
    def state_dims(self) -> tuple[str, str]:
        return ("variable", "neuron")

    def state_coords(self) -> dict[str, torch.Tensor]:
        """Variable index ``(2,)`` (0 = v, 1 = w) and neuron index ``(n,)`` along the ring."""
        return {"variable": torch.arange(2), "neuron": torch.arange(self.size)}

    # ----------------------------------------------------------------------------------------
    # right-hand side
    def _laplacian(self, v: torch.Tensor) -> torch.Tensor:
        """Periodic second difference along the last (neuron) axis, ``(B, n) -> (B, n)``."""
        return torch.roll(v, 1, dims=-1) + torch.roll(v, -1, dims=-1) - 2.0 * v

    def _tendency(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        # Unchecked right-hand side; rk4 calls this four times per step.
        v, w = x[:, 0], x[:, 1]
        a, b = theta_column(theta, _A, 1), theta_column(theta, _B, 1)
        tau, i_ext = theta_column(theta, _TAU, 1), theta_column(theta, _I, 1)
        dv = v - v * v * v / 3.0 - w + i_ext
        if self.coupling != 0.0:
            # Skipping the term when D = 0 keeps uncoupled neurons exactly independent.
            dv = dv + self.coupling * self._laplacian(v)
        dw = (v + a - b * w) / tau
        return torch.stack((dv, dw), dim=1)

    def tendency(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Time derivative ``dx/dt`` of every member.

        Args:
            x: states ``(B, 2, n)``.
            theta: ``(B, 4)`` = (a, b, τ, I_ext) in the natural space.

        Returns:
            ``(B, 2, n)``.
        """
        check_batch(x, theta, self.state_shape, len(self.params))
        return self._tendency(x, theta.to(dtype=x.dtype, device=x.device))

    def tendency_jvp(self, x: torch.Tensor, theta: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        """Tangent-linear model: the state Jacobian of :meth:`tendency` applied to ``dx``.

        ``J dx = ((1 − v²) dv − dw + D Δdv, (dv − b dw) / τ)`` with Δ the ring Laplacian.

        Args:
            x: linearisation states ``(B, 2, n)``.
            theta: ``(B, 4)``.
            dx: perturbations ``(B, 2, n)``.

        Returns:
            ``(B, 2, n)``.
        """
        check_batch(x, theta, self.state_shape, len(self.params))
        if dx.shape != x.shape:
            raise ValueError(f"dx has shape {tuple(dx.shape)}; expected {tuple(x.shape)}")
        theta = theta.to(dtype=x.dtype, device=x.device)
        v = x[:, 0]
        dv, dw = dx[:, 0], dx[:, 1]
        b, tau = theta_column(theta, _B, 1), theta_column(theta, _TAU, 1)
        jv = (1.0 - v * v) * dv - dw
        if self.coupling != 0.0:
            jv = jv + self.coupling * self._laplacian(dv)
        jw = (dv - b * dw) / tau
        return torch.stack((jv, jw), dim=1)

    def step(self, x: torch.Tensor, theta: torch.Tensor, dt: float | None = None) -> torch.Tensor:
        """One classical RK4 step of every member.

        Args:
            x: states ``(B, 2, n)``.
            theta: ``(B, 4)``.
            dt: step size; ``default_dt`` (0.1) when None.

        Returns:
            ``(B, 2, n)``, same dtype and device as ``x``.
        """
        check_batch(x, theta, self.state_shape, len(self.params))
        theta = theta.to(dtype=x.dtype, device=x.device)
        dt = self.default_dt if dt is None else float(dt)
        return rk4(lambda y: self._tendency(y, theta), x, dt)

    # ----------------------------------------------------------------------------------------
    # analytic fixed point
    def fixed_point(self, theta: torch.Tensor) -> torch.Tensor:
        """Fixed point ``(v*, w*)`` of the uncoupled neuron, in closed form.

        With ``w* = (v* + a) / b`` the condition ``dv/dt = 0`` is the depressed cubic
        ``v³ + p v + q = 0`` with ``p = 3 (1/b − 1)`` and ``q = 3 (a/b − I_ext)``. When it has
        one real root (always for ``b ≤ 1``) that root is returned (Cardano, written to avoid
        cancellation). When it has three real roots (possible only for ``b > 1``) the
        **largest** one is returned (trigonometric method). One Newton step polishes the root.
        A uniform ring at this point is also a fixed point of the coupled model.

        Computed in float64 and cast back to θ's dtype.

        Args:
            theta: ``(B, 4)`` = (a, b, τ, I_ext).

        Returns:
            ``(B, 2)``: ``v*`` in column 0, ``w*`` in column 1.
        """
        if theta.ndim != 2 or theta.shape[1] != len(self.params):
            raise ValueError(
                f"theta has shape {tuple(theta.shape)}; expected (B, {len(self.params)})"
            )
        th = theta.to(torch.float64)
        a, b, i_ext = th[:, _A], th[:, _B], th[:, _I]
        p = 3.0 * (1.0 / b - 1.0)
        q = 3.0 * (a / b - i_ext)
        disc = 0.25 * q * q + p * p * p / 27.0  # > 0: one real root; < 0: three

        # One real root: u = cbrt(−q/2 − sign(q) √disc) has no cancellation; root = u − p/(3u).
        sq = torch.sqrt(disc.clamp(min=0.0))
        t = -0.5 * q - torch.where(q >= 0, sq, -sq)
        u = torch.sign(t) * t.abs().pow(1.0 / 3.0)
        u_safe = torch.where(u == 0, torch.ones_like(u), u)  # u = 0 only if p = q = 0 (root 0)
        one_root = torch.where(u == 0, torch.zeros_like(u), u - p / (3.0 * u_safe))

        # Three real roots (p < 0): v_k = m cos(φ/3 − 2πk/3); k = 0 is the largest.
        p_neg = p.clamp(max=-1e-300)  # keeps the unused branch finite
        m = 2.0 * torch.sqrt(-p_neg / 3.0)
        cos_arg = (1.5 * q / p_neg * torch.sqrt(-3.0 / p_neg)).clamp(-1.0, 1.0)
        three_roots = m * torch.cos(torch.acos(cos_arg) / 3.0)

        vs = torch.where(disc >= 0, one_root, three_roots)
        # Newton polish; skipped where the cubic's slope vanishes (double root).
        g = vs * vs * vs + p * vs + q
        dg = 3.0 * vs * vs + p
        ok = dg.abs() > 1e-12
        vs = vs - torch.where(ok, g / torch.where(ok, dg, torch.ones_like(dg)), torch.zeros_like(g))
        ws = (vs + a) / b
        return torch.stack((vs, ws), dim=-1).to(theta.dtype)

    # ----------------------------------------------------------------------------------------
    # initial conditions
    def initial_state(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Random states near the limit cycle: ``v ~ U(−2, 2)``, ``w ~ U(−0.5, 1.5)`` per neuron.

        Drawn in float64 on the CPU with ``generator`` and then moved, so a seed gives the same
        states on every device and dtype.

        Args:
            batch: number of members ``B``.
            generator: CPU random generator (the global one when None).

        Returns:
            ``(batch, 2, n)``.
        """
        r = torch.rand(batch, 2, self.size, generator=generator, dtype=torch.float64)
        low = torch.tensor([-2.0, -0.5], dtype=torch.float64).reshape(1, 2, 1)
        width = torch.tensor([4.0, 2.0], dtype=torch.float64).reshape(1, 2, 1)
        return (low + width * r).to(dtype=dtype, device=device)
