"""Two-dimensional Kolmogorov flow: forced, damped, incompressible Navier–Stokes on a torus.

The state is the vorticity ``ω(y, x)`` on an ``n × n`` periodic grid over ``[0, L)²`` (``L = 2π``
by default), stored with axis order ``(y, x)`` (the last axis is ``x``). It obeys

    ∂ω/∂t + u·∇ω = ν ∇²ω − μ ω + f,

with the velocity recovered from the streamfunction ``ψ``: ``∇²ψ = −ω`` (``ψ̂ = ω̂/|k|²``, mean
mode zero), ``u = ∂ψ/∂y``, ``v = −∂ψ/∂x``. The flow is driven by the body force
``F = (A sin(k_f y), 0)`` in the momentum equation, whose curl gives the vorticity forcing

    f = ∂F_y/∂x − ∂F_x/∂y = −A k_f cos(k_f y).

θ = (viscosity ν, linear drag μ); the model is nondimensional (unit length and velocity scales),
so ν = 1e-3 is Re = 1000.

Numerics
--------
Pseudo-spectral Fourier–Galerkin with the 2/3 rule: only modes with ``|k_x|, |k_y| < n/3`` (mode
numbers) are kept, and quadratic products are truncated to the same band, which removes aliasing
exactly. The spectral state therefore only stores the ``kc = ⌊(n−1)/3⌋ + 1`` non-negative ``k_x``
of the ``rfft2`` half-spectrum, ``k_x``-major: ``ω̂[b, k_x, k_y]`` has shape ``(B, kc, n)`` with
``k_y`` in ``torch.fft.fftfreq`` order and the ``rfft2`` normalisation (unnormalised forward), i.e.
``ω̂ = rfft2(ω)[..., :kc].transpose(-1, -2)`` restricted to the band.

The advection term uses Basdevant's form ``u·∇ω = ∂x∂y(v² − u²) + (∂x² − ∂y²)(uv)`` (valid for
any divergence-free field): one batched inverse transform of ``(û, v̂)`` and one batched forward
transform of ``(v² − u², uv)``, i.e. 4 real 2-D transforms per stage instead of 5 for the
``u ω_x + v ω_y`` form. With exact dealiasing both forms give the same Galerkin tendency (up to
rounding), so energy and enstrophy are conserved by the inviscid, unforced semi-discrete system.

The linear terms ``L = −ν|k|² − μ`` are integrated exactly with an integrating factor and the
rest with classical RK4 (Lawson's IFRK4, 4th order). Each 2-D transform is done as two batched
1-D passes so that the all-zero ``k_x ≥ n/3`` are skipped in the ``y`` pass; the ``y`` pass runs
on ``k_x``-major data and the ``x`` pass on ``y``-major data (one 2-D transpose per inverse
transform), which on the CPU is cheaper than the strided passes inside ``irfft2``.

FFT budget: :meth:`Kolmogorov.step_spectral` costs 4 stages × 4 = 16 real 2-D transforms of one
``n × n`` field per member; :meth:`Kolmogorov.step` adds one forward and one inverse transform of
the state, 18 in all (``ffts_per_step``).

The step is written with in-place operations on per-call buffers and is not meant to be
differentiated through.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from kernels.dynamics.base import Dynamics, Param, check_batch

__all__ = ["Kolmogorov"]

_TINY = sys.float_info.min  # exclusive lower bound for log-transformed parameters


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype == torch.float64:
        return torch.complex128
    if dtype == torch.float32:
        return torch.complex64
    raise TypeError(f"Kolmogorov supports float32 and float64 states, got {dtype}")


@dataclass(frozen=True)
class _Operators:
    """Wavenumber tables for one (dtype, device); see ``Kolmogorov._ops``.

    Compact tables are ``(kc, n)`` (``k_x``-major, like the spectral state); ``full`` ones are the
    whole ``(n, n//2+1)`` ``rfft2`` half-spectrum, used by the diagnostics helpers.
    """

    k2: torch.Tensor  # (kc, n) real |k|²
    mask: torch.Tensor  # (kc, n) real 1/0: the dealiased band
    vel: torch.Tensor  # (2, kc, n) complex: ω̂ -> (û, v̂), masked
    c_xy: torch.Tensor  # (kc, n) real: symbol of ∂x∂y, masked
    c_d: torch.Tensor  # (kc, n) real: symbol of ∂x² − ∂y², masked
    forcing_row: torch.Tensor | None  # (n,) complex: f̂ at k_x = 0 (None when A = 0)
    ikx_full: torch.Tensor  # (1, n//2+1) complex: i k_x, Nyquist zeroed
    iky_full: torch.Tensor  # (n, 1) complex: i k_y, Nyquist zeroed
    inv_k2_full: torch.Tensor  # (n, n//2+1) real: 1/|k|², 0 at the mean mode
    kmode_full: torch.Tensor  # (n, n//2+1) real: |mode number|
    mask_full: torch.Tensor  # (n, n//2+1) real: the dealiased band


class Kolmogorov(Dynamics):
    """Forced, damped 2-D Navier–Stokes in vorticity form (Kolmogorov flow).

    State ``(B, n, n)``: vorticity on the ``(y, x)`` grid. θ ``(B, 2)``: (viscosity, drag).

    Args:
        size: grid points per side ``n``; even and at least 8.
        forcing_wavenumber: ``k_f`` (mode number) of the body force ``A sin(k_f y)``; must lie in
            the dealiased band ``k_f < n/3`` when the forcing is on.
        forcing_amplitude: ``A``; 0 gives unforced decaying flow.
        domain: side ``L`` of the periodic square.
    """

    name = "kolmogorov"
    variables = ("vorticity",)
    state_units = "1"
    #: the curl of a periodic velocity: the solver holds the k = 0 mode at zero
    mean_free = (0,)
    default_dt = 0.01
    params = (
        Param(
            "viscosity",
            truth=1e-3,
            prior_loc=math.log(1e-3),
            prior_scale=0.5,
            transform="log",
            units="1",
            description="nondimensional kinematic viscosity ν (1/Re for unit velocity and length)",
            lower=_TINY,
        ),
        Param(
            "drag",
            truth=0.1,
            prior_loc=math.log(0.1),
            prior_scale=0.5,
            transform="log",
            units="1",
            description="nondimensional linear (Rayleigh) drag rate μ",
            lower=_TINY,
        ),
    )
    #: real 2-D transforms of one n×n field per member in :meth:`step` (16 in the RK stages plus
    #: the forward/inverse transform of the state).
    ffts_per_step: int = 18
    #: the same for :meth:`step_spectral` (RK stages only).
    ffts_per_spectral_step: int = 16
    #: mode number at which the initial vorticity spectrum peaks.
    initial_peak_wavenumber: float = 4.0
    #: RMS velocity of :meth:`initial_state`.
    initial_rms_velocity: float = 1.0

    def __init__(
        self,
        size: int = 64,
        *,
        forcing_wavenumber: int = 4,
        forcing_amplitude: float = 1.0,
        domain: float = 2 * math.pi,
    ) -> None:
        if not isinstance(size, int) or size < 8 or size % 2:
            raise ValueError(f"Kolmogorov size must be an even integer >= 8, got {size!r}")
        if domain <= 0:
            raise ValueError(f"domain must be positive, got {domain}")
        if forcing_amplitude != 0 and not 0 < 3 * forcing_wavenumber < size:
            raise ValueError(
                f"forcing_wavenumber {forcing_wavenumber} is outside the dealiased band "
                f"0 < k_f < n/3 = {size / 3:.2f} of a {size}² grid; use a larger size or a "
                "smaller forcing_wavenumber"
            )
        self.size = size
        self.forcing_wavenumber = int(forcing_wavenumber)
        self.forcing_amplitude = float(forcing_amplitude)
        self.domain = float(domain)
        #: retained k_x columns: mode numbers 0 .. kc-1 satisfy 3k < n.
        self.kc = (size - 1) // 3 + 1
        self._cache: dict[tuple[torch.dtype, torch.device], _Operators] = {}

    # ----------------------------------------------------------------------------------------
    # shapes and coordinates
    @property
    def state_shape(self) -> tuple[int, int]:
        return (self.size, self.size)

    @property
    def spectral_shape(self) -> tuple[int, int]:
        """Shape ``(kc, n)`` of one member's compact spectral state (see module docstring)."""
        return (self.kc, self.size)

    @property
    def state_dims(self) -> tuple[str, str]:
        return ("y", "x")

    def state_coords(self) -> dict[str, torch.Tensor]:
        pos = torch.arange(self.size, dtype=torch.float64) * (self.domain / self.size)
        return {"y": pos, "x": pos.clone()}

    @property
    def dx(self) -> float:
        """Grid spacing ``L / n``."""
        return self.domain / self.size

    def stable_dt(self, max_velocity: float, cfl: float = 0.5) -> float:
        """Advective CFL step ``cfl · dx / max|u|``.

        The linear terms are integrated exactly, so there is no diffusive limit.

        Args:
            max_velocity: bound on the speed ``|u|`` over the grid (> 0).
            cfl: Courant number; 0.5 leaves margin for RK4 on the dealiased spectrum.
        """
        if max_velocity <= 0:
            raise ValueError(f"max_velocity must be positive, got {max_velocity}")
        return cfl * self.dx / max_velocity

    #: slack on the enstrophy bound of :meth:`unstable`, for time-stepping and rounding error.
    #: Measured (rms₁ − elapsed·rms f) / rms₀: at most 0.93 in the 640 stored 128² trajectories
    #: (40,320 intervals of 0.2), 0.98 at 16² and 32² with dt 0.02; 1.05 to 1e11 in the interval
    #: where dt 0.1–0.4 outran RK4 at 16²–64², every one still finite.
    norm_slack: float = 1.01

    def unstable(self, before: torch.Tensor, after: torch.Tensor, elapsed: float) -> torch.Tensor:
        """Non-finite rows, and rows whose enstrophy grew faster than the forcing allows.

        Advection conserves enstrophy in the dealiased (Galerkin) system and ν, μ only remove
        it, so ``d‖ω‖/dt ≤ ‖f‖``: over ``elapsed`` the rms vorticity rises by at most
        ``elapsed · rms f``. A row with ``rms ω₁ > norm_slack · rms ω₀ + elapsed · rms f`` is a
        step past RK4's stability limit, whose grid-scale modes grow by orders of magnitude per
        interval while the state is still finite.

        Args:
            before: vorticity ``(B, n, n)``.
            after: vorticity ``elapsed`` later ``(B, n, n)``.
            elapsed: model time between them.

        Returns:
            ``(B,)`` bool.
        """
        bad = super().unstable(before, after, elapsed)
        rms0 = before.detach().square().flatten(1).mean(dim=1).sqrt()
        rms1 = after.detach().square().flatten(1).mean(dim=1).sqrt()
        # rms of A k cos(k y) on the grid: A k / √2 (3 k_f < n, so cos² averages to ½)
        k = self.forcing_wavenumber * 2 * math.pi / self.domain
        rms_f = abs(self.forcing_amplitude) * k / math.sqrt(2.0)
        return bad | ~(rms1 <= self.norm_slack * rms0 + elapsed * rms_f)

    # ----------------------------------------------------------------------------------------
    # cached operators
    def _ops(self, dtype: torch.dtype, device: torch.device) -> _Operators:
        key = (dtype, torch.device(device))
        ops = self._cache.get(key)
        if ops is None:
            ops = self._build_ops(dtype, key[1])
            self._cache[key] = ops
        return ops

    def _build_ops(self, dtype: torch.dtype, device: torch.device) -> _Operators:
        # Built in float64 on the CPU, then cast, so that every (dtype, device) sees the same table.
        n, kc = self.size, self.kc
        cdtype = _complex_dtype(dtype)
        scale = 2 * math.pi / self.domain
        my = torch.fft.fftfreq(n, 1.0 / n, dtype=torch.float64)  # mode numbers along y
        mx = torch.arange(n // 2 + 1, dtype=torch.float64)  # along x (half-spectrum)
        band = (3 * my.abs() < n)[:, None] & (3 * mx < n)[None, :]  # (n, n//2+1)
        kx_full, ky_full = mx * scale, my * scale
        k2_full = kx_full[None, :] ** 2 + ky_full[:, None] ** 2
        inv_k2_full = torch.where(k2_full > 0, 1.0 / k2_full.clamp_min(1e-300), 0.0)
        # Derivatives of real fields drop the Nyquist mode (its sign is ambiguous).
        dkx = torch.where(mx == n // 2, 0.0, kx_full)
        dky = torch.where(my.abs() == n // 2, 0.0, ky_full)

        # Compact (kc, n) tables: k_x along rows, k_y along columns.
        mask = band[:, :kc].T.to(torch.float64)
        kx, ky = kx_full[:kc, None], ky_full[None, :]
        k2 = kx**2 + ky**2
        inv_k2 = inv_k2_full[:, :kc].T
        vel = torch.stack([1j * ky * inv_k2, -1j * kx * inv_k2]) * mask  # û = i k_y ψ̂, v̂ = −i k_x ψ̂
        c_xy = -(kx * ky) * mask
        c_d = (ky**2 - kx**2) * mask  # symbol of ∂x² − ∂y² is −k_x² + k_y²

        forcing_row = None
        if self.forcing_amplitude != 0:
            f = self.forcing(torch.float64, "cpu")
            forcing_row = torch.fft.rfft2(f)[:, 0] * mask[0]

        def real(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype).contiguous()

        def cplx(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=cdtype).contiguous()

        return _Operators(
            k2=real(k2),
            mask=real(mask),
            vel=cplx(vel),
            c_xy=real(c_xy),
            c_d=real(c_d),
            forcing_row=None if forcing_row is None else cplx(forcing_row),
            ikx_full=cplx(1j * dkx[None, :]),
            iky_full=cplx(1j * dky[:, None]),
            inv_k2_full=real(inv_k2_full),
            kmode_full=real(torch.sqrt(mx[None, :] ** 2 + my[:, None] ** 2)),
            mask_full=real(band.to(torch.float64)),
        )

    # ----------------------------------------------------------------------------------------
    # transforms between the grid and the compact dealiased spectrum
    def to_spectral(self, omega: torch.Tensor) -> torch.Tensor:
        """Project physical vorticity onto the dealiased band.

        Args:
            omega: ``(B, n, n)`` real.

        Returns:
            ``(B, kc, n)`` complex, ``k_x``-major: the ``rfft2`` coefficients with
            ``|k_x|, |k_y| < n/3``.
        """
        ops = self._ops(omega.dtype, omega.device)
        # x pass on every row, then the y pass on the kept k_x along contiguous rows: a pass
        # along the strided axis groups the lines of different members into SIMD blocks, and
        # the rounding then depends on the batch (1e-14 differences on AVX-512 CPUs)
        r = torch.fft.rfft(omega, dim=-1)[..., : self.kc].transpose(-1, -2).contiguous()
        return torch.fft.fft(r, dim=-1).mul_(ops.mask)

    def to_physical(self, omega_hat: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_spectral`: ``(B, kc, n)`` complex -> ``(B, n, n)`` real."""
        y = torch.fft.ifft(omega_hat, dim=-1)
        # irfft zero-pads the missing k_x >= n/3.
        return torch.fft.irfft(y.transpose(-1, -2), n=self.size, dim=-1).contiguous()

    # ----------------------------------------------------------------------------------------
    # dynamics
    def _advection(self, w: torch.Tensor, ops: _Operators) -> torch.Tensor:
        """Spectral ``u·∇ω − f`` of the compact state ``w`` ``(B, kc, n)``, as ``(B, kc, n)``."""
        b = w.shape[0]
        n, kc = self.size, self.kc
        # (û, v̂): y pass on the kept k_x, then one 2-D transpose to y-major (a fast blocked
        # copy on the CPU) so that the c2r x pass, which zero-pads k_x >= kc, is contiguous.
        spec = w.unsqueeze(1) * ops.vel  # (B, 2, kc, n_y)
        s = torch.fft.ifft(spec, dim=-1)
        # The product buffer is free again: reuse it as the transpose target (reshape only
        # copies for non-contiguous layouts, which the CPU path does not produce).
        s = spec.reshape(n, b * 2 * kc).copy_(s.reshape(b * 2 * kc, n).t()).view(n, b, 2, kc)
        uv = torch.fft.irfft(s, n=n, dim=-1)  # (n_y, B, 2, n_x)
        u, v = uv[:, :, 0], uv[:, :, 1]
        q = torch.empty_like(uv)  # Basdevant products (v² − u², uv)
        torch.mul(v, v, out=q[:, :, 0]).addcmul_(u, u, value=-1.0)
        torch.mul(u, v, out=q[:, :, 1])
        # x pass, then the y pass on the kept k_x only; torch lays its output out k_x-major, so
        # the permuted view is (close to) contiguous.
        r = torch.fft.fft(torch.fft.rfft(q, dim=-1)[..., :kc], dim=0).permute(1, 2, 3, 0)
        adv = torch.mul(r[:, 0], ops.c_xy).addcmul_(r[:, 1], ops.c_d)  # (B, kc, n)
        if ops.forcing_row is not None:
            adv[:, 0].sub_(ops.forcing_row)
        return adv

    def step_spectral(
        self, omega_hat: torch.Tensor, theta: torch.Tensor, dt: float | None = None
    ) -> torch.Tensor:
        """One IFRK4 step of the compact spectral state (16 real 2-D transforms per member).

        Args:
            omega_hat: ``(B, kc, n)`` complex, as returned by :meth:`to_spectral`.
            theta: ``(B, 2)`` (viscosity, drag); ν = 0 and μ = 0 are accepted.
            dt: step size; ``default_dt`` when None.

        Returns:
            ``(B, kc, n)`` complex, inside the dealiased band.
        """
        h = self.default_dt if dt is None else float(dt)
        w0 = omega_hat.contiguous()
        b = w0.shape[0]
        if tuple(w0.shape[1:]) != self.spectral_shape or not w0.is_complex():
            raise ValueError(
                f"spectral state has shape {tuple(w0.shape)} and dtype {w0.dtype}; expected "
                f"complex (B, {self.kc}, {self.size})"
            )
        if theta.ndim != 2 or theta.shape != (b, len(self.params)):
            raise ValueError(
                f"theta has shape {tuple(theta.shape)}; expected ({b}, {len(self.params)})"
            )
        rdtype = w0.real.dtype
        ops = self._ops(rdtype, w0.device)
        theta = theta.to(dtype=rdtype, device=w0.device)
        nu = theta[:, 0].reshape(b, 1, 1)
        mu = theta[:, 1].reshape(b, 1, 1)
        # Half-step integrating factor exp(L h/2), L = −ν|k|² − μ, per member.
        e = torch.addcmul(mu * (-0.5 * h), nu * (-0.5 * h), ops.k2).exp_()  # (B, kc, n) real

        # Lawson IFRK4 with K = −N (N the non-stiff tendency), factored so that only exp(Lh/2)
        # is needed: w_new = E(E(w + h/6 N1) + h/3 (N2 + N3)) + h/6 N4.
        k = self._advection(w0, ops)
        stage = torch.add(w0, k, alpha=-0.5 * h).mul_(e)
        acc = torch.add(w0, k, alpha=-h / 6).mul_(e)
        ew = w0 * e
        k = self._advection(stage, ops)
        torch.add(ew, k, alpha=-0.5 * h, out=stage)
        acc.add_(k, alpha=-h / 3)
        k = self._advection(stage, ops)
        acc.add_(k, alpha=-h / 3).mul_(e)
        torch.add(ew, k, alpha=-h, out=stage).mul_(e)
        k = self._advection(stage, ops)
        # Out-of-band modes were never read by the tendency; drop them once here.
        return acc.add_(k, alpha=-h / 6).mul_(ops.mask)

    def step(self, x: torch.Tensor, theta: torch.Tensor, dt: float | None = None) -> torch.Tensor:
        """Advance the vorticity ``(B, n, n)`` by one IFRK4 step (18 real 2-D FFTs per member).

        The input is first projected onto the dealiased band; the output lies in it.
        """
        check_batch(x, theta, self.state_shape, len(self.params))
        return self.to_physical(self.step_spectral(self.to_spectral(x), theta, dt))

    # ----------------------------------------------------------------------------------------
    # diagnostics
    def forcing(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Vorticity forcing ``f = −A k_f cos(k_f y)`` on the grid, ``(n, n)``."""
        y = torch.arange(self.size, dtype=torch.float64) * self.dx
        k = self.forcing_wavenumber * 2 * math.pi / self.domain
        f = (-self.forcing_amplitude * k) * torch.cos(k * y)
        return f[:, None].expand(self.size, self.size).to(dtype=dtype, device=device).contiguous()

    def velocity(self, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocity ``(u, v)`` of vorticity ``omega`` ``(B, n, n)``; each ``(B, n, n)``.

        Nyquist modes of ``omega`` do not contribute (their derivative is ambiguous).
        """
        ops = self._ops(omega.dtype, omega.device)
        psi = torch.fft.rfft2(omega).mul_(ops.inv_k2_full)
        uv_hat = torch.stack([psi * ops.iky_full, -psi * ops.ikx_full], dim=-3)
        uv = torch.fft.irfft2(uv_hat, s=self.state_shape)
        return uv[..., 0, :, :], uv[..., 1, :, :]

    def vorticity(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Vorticity ``∂v/∂x − ∂u/∂y`` of the velocity; ``(B, n, n)`` each, ``(B, n, n)`` out."""
        ops = self._ops(u.dtype, u.device)
        uv_hat = torch.fft.rfft2(torch.stack([u, v], dim=-3))
        w_hat = uv_hat[..., 1, :, :] * ops.ikx_full - uv_hat[..., 0, :, :] * ops.iky_full
        return torch.fft.irfft2(w_hat, s=self.state_shape)

    def energy(self, omega: torch.Tensor) -> torch.Tensor:
        """Kinetic energy ``½ mean(u² + v²)`` per member, ``(B, n, n) -> (B,)``."""
        u, v = self.velocity(omega)
        return 0.5 * (u.square() + v.square()).mean(dim=(-2, -1))

    def enstrophy(self, omega: torch.Tensor) -> torch.Tensor:
        """Enstrophy ``½ mean(ω²)`` per member, ``(B, n, n) -> (B,)``."""
        return 0.5 * omega.square().mean(dim=(-2, -1))

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
        """Smooth random vorticity ``(batch, n, n)``.

        A Gaussian random field whose vorticity amplitude spectrum is
        ``(k/k0)² exp(−(k/k0)²)`` (``k`` the mode number, ``k0 = initial_peak_wavenumber``),
        restricted to the dealiased band, with zero mean, and scaled per member to an RMS velocity
        of ``initial_rms_velocity``. Drawn in float64 on the CPU with ``generator`` and then moved,
        so every device and dtype sees the same field.
        """
        n = self.size
        noise = torch.randn(batch, n, n, generator=generator, dtype=torch.float64)
        ops = self._ops(torch.float64, torch.device("cpu"))
        s = ops.kmode_full / self.initial_peak_wavenumber
        amp = s.square() * torch.exp(-s.square()) * ops.mask_full  # zero at k = 0: zero mean
        omega = torch.fft.irfft2(torch.fft.rfft2(noise) * amp, s=(n, n))
        rms = torch.sqrt(2 * self.energy(omega)).clamp_min(1e-300)
        omega = omega * (self.initial_rms_velocity / rms)[:, None, None]
        return omega.to(dtype=dtype, device=device)
