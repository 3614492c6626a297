"""Periodic Korteweg–de Vries equation, pseudo-spectral in x, ETDRK4 in time.

    u_t + α u u_x + δ u_xxx = 0,    x ∈ [0, L) periodic,   θ = (α, δ)

In Fourier space (real FFT, wavenumbers k = 2π j / L, j = 0..n/2) the equation splits into a
stiff linear part and a mild nonlinear part,

    û_t = L(k) û + N(û),   L(k) = i δ k³,   N(û) = −(α/2) (ik) FFT(u²),

since δ (ik)³ = −i δ k³ moves to the right-hand side with a plus sign. The linear part is
integrated exactly by the exponential time-differencing RK4 scheme of Kassam & Trefethen (2005,
SIAM J. Sci. Comput. 26:1214). Its coefficients are φ-functions of h·L evaluated by a complex
contour integral (M = 32 points on the unit circle around each h·L), which avoids the
cancellation of the closed forms for small |h·L|. Because δ differs per member, so do the
coefficients; the last set is cached and reused while θ, dt, dtype and device stay the same.

Odd derivatives zero the Nyquist mode (its derivative is not representable in a real signal),
so that mode is simply carried unchanged. With ``dealias=True`` (default) the quadratic product
obeys Orszag's 2/3 rule: only modes with 3 j < n enter u² and receive N, which makes the
semi-discrete system conserve ∫u dx and ∫u² dx exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels.dynamics.base import Dynamics, Param, check_batch

#: number of contour points for the ETDRK4 φ-functions (Kassam & Trefethen use 32 or 64).
CONTOUR_POINTS = 32


def soliton(
    x: torch.Tensor | float,
    t: torch.Tensor | float,
    amplitude: torch.Tensor | float,
    x0: torch.Tensor | float,
    alpha: torch.Tensor | float = 6.0,
    delta: torch.Tensor | float = 1.0,
    *,
    length: float | None = None,
) -> torch.Tensor:
    """Exact single soliton of u_t + α u u_x + δ u_xxx = 0 on the infinite line.

    u(x, t) = A sech²(κ (x − x0 − c t)) with c = α A / 3 and κ = sqrt(α A / (12 δ)).

    Args:
        x: positions, any shape broadcastable with the other arguments (e.g. ``(n,)``).
        t: time.
        amplitude: A > 0 (e.g. ``(B, 1)`` for a batch of solitons).
        x0: position of the crest at t = 0.
        alpha, delta: equation coefficients (> 0).
        length: if given, the crest offset is wrapped to the nearest periodic image in
            [−L/2, L/2), so the profile is centred correctly on a periodic domain of that length
            (its tails must be negligible at distance L/2 for this to be a good approximation).

    Returns:
        u with the broadcast shape of the arguments, as a tensor.
    """
    x = x if torch.is_tensor(x) else torch.as_tensor(x, dtype=torch.float64)
    amplitude, alpha, delta, t, x0 = (torch.as_tensor(v, dtype=x.dtype, device=x.device)
                                      if not torch.is_tensor(v) else v
                                      for v in (amplitude, alpha, delta, t, x0))
    speed = alpha * amplitude / 3.0
    kappa = torch.sqrt(alpha * amplitude / (12.0 * delta))
    offset = x - x0 - speed * t
    if length is not None:
        offset = torch.remainder(offset + 0.5 * length, length) - 0.5 * length
    return amplitude / torch.cosh(kappa * offset) ** 2


def _wavenumbers(n: int, length: float, device: torch.device) -> torch.Tensor:
    """Real-FFT wavenumbers 2πj/L, j = 0..n/2, float64 ``(n//2 + 1,)``."""
    return torch.arange(n // 2 + 1, dtype=torch.float64, device=device) * (2.0 * math.pi / length)


def _odd_wavenumbers(n: int, length: float, device: torch.device) -> torch.Tensor:
    """Wavenumbers for odd derivatives: the Nyquist one is zeroed, ``(n//2 + 1,)`` float64."""
    k = _wavenumbers(n, length, device)
    k[-1] = 0.0
    return k


def mass(u: torch.Tensor, length: float) -> torch.Tensor:
    """∫u dx over the periodic domain (rectangle rule, spectrally exact), ``(B, n) -> (B,)``."""
    return u.sum(-1) * (length / u.shape[-1])


def momentum(u: torch.Tensor, length: float) -> torch.Tensor:
    """∫u² dx (the quadratic invariant, "energy"), ``(B, n) -> (B,)``."""
    return (u * u).sum(-1) * (length / u.shape[-1])


def hamiltonian(u: torch.Tensor, theta: torch.Tensor, length: float) -> torch.Tensor:
    """H = ∫(δ/2 u_x² − α/6 u³) dx, with u_x computed spectrally.

    Args:
        u: states ``(B, n)``.
        theta: ``(B, 2)`` = (α, δ) per member.
        length: domain length L.

    Returns:
        ``(B,)``.
    """
    n = u.shape[-1]
    ik = 1j * _odd_wavenumbers(n, length, u.device).to(u.dtype)
    ux = torch.fft.irfft(ik * torch.fft.rfft(u, dim=-1), n=n, dim=-1)
    alpha = theta[:, 0:1].to(u.dtype)
    delta = theta[:, 1:2].to(u.dtype)
    return (0.5 * delta * ux * ux - alpha / 6.0 * u**3).sum(-1) * (length / n)


@dataclass
class KdVCoefficients:
    """One cached set of per-member ETDRK4 coefficients, each ``(B, n//2 + 1)`` complex."""

    theta: torch.Tensor  # (B, 2) float64, the key (compared with torch.equal)
    dt: float
    dtype: torch.dtype
    device: torch.device
    E: torch.Tensor  # exp(hL)
    E2: torch.Tensor  # exp(hL/2)
    Q: torch.Tensor
    f1: torch.Tensor
    f2: torch.Tensor
    f3: torch.Tensor
    g: torch.Tensor  # N(û) = g · FFT(u²): −(α/2) i k, with the dealiasing mask applied
    mask: torch.Tensor | None  # (nk,) 0/1 2/3-rule mask in the state dtype, None without dealias


def etdrk4_coefficients(
    hL: torch.Tensor, dt: float, points: int = CONTOUR_POINTS
) -> tuple[torch.Tensor, ...]:
    """ETDRK4 coefficients by contour integration (Kassam & Trefethen 2005, eq. 2.5 and §5).

    Each φ-type function f(z) is entire, so f(hL) is the mean of f over a circle of radius 1
    around hL; the trapezoidal rule on that circle converges geometrically and never evaluates
    f close to its removable singularity at 0. The loop runs over the contour points only, so
    memory stays at a few arrays the size of ``hL`` whatever the batch.

    Args:
        hL: dt · L(k), complex128, any shape (here ``(U, n//2 + 1)``).
        dt: step size h.
        points: number of contour points M.

    Returns:
        (E, E2, Q, f1, f2, f3), each with the shape of ``hL``, complex128.
    """
    q = torch.zeros_like(hL)
    f1 = torch.zeros_like(hL)
    f2 = torch.zeros_like(hL)
    f3 = torch.zeros_like(hL)
    roots = torch.exp(
        2j * math.pi * (torch.arange(1, points + 1, dtype=torch.float64) - 0.5) / points
    ).tolist()
    for r in roots:
        z = hL + r
        ez = torch.exp(z)
        z2 = z * z
        z3 = z2 * z
        q += (torch.exp(0.5 * z) - 1.0) / z
        f1 += (-4.0 - z + ez * (4.0 - 3.0 * z + z2)) / z3
        f2 += (2.0 + z + ez * (z - 2.0)) / z3
        f3 += (-4.0 - 3.0 * z - z2 + ez * (4.0 - z)) / z3
    scale = dt / points
    return torch.exp(hL), torch.exp(0.5 * hL), q * scale, f1 * scale, f2 * scale, f3 * scale


class KdV(Dynamics):
    """Periodic KdV with ``size`` grid points on [0, ``length``), θ = (α, δ) per member.

    Args:
        size: number of grid points n (even, >= 16).
        length: domain length L (> 0).
        dealias: apply the 2/3 rule to the quadratic term.
    """

    name = "kdv"
    params = (
        Param(
            "alpha",
            truth=6.0,
            prior_loc=math.log(6.0),
            prior_scale=0.25,
            transform="log",
            units="1",
            description="nonlinear (advection) coefficient α in u_t + α u u_x + δ u_xxx = 0",
            lower=0.0,
        ),
        Param(
            "delta",
            truth=1.0,
            prior_loc=0.0,
            prior_scale=0.25,
            transform="log",
            units="1",
            description="dispersion coefficient δ in u_t + α u u_x + δ u_xxx = 0",
            lower=0.0,
        ),
    )
    default_dt = 0.005  # at n=128, L=40; instances rescale with dx (see __init__)
    variables = ("u",)
    state_units = "1"

    #: range of the soliton amplitudes drawn by :meth:`initial_state`.
    amplitude_range: tuple[float, float] = (0.5, 2.0)

    def __init__(self, size: int = 128, *, length: float = 40.0, dealias: bool = True) -> None:
        if isinstance(size, bool) or int(size) != size or size < 16 or int(size) % 2:
            raise ValueError(f"kdv size must be an even integer >= 16, got {size!r}")
        if not (math.isfinite(length) and length > 0):
            raise ValueError(f"kdv length must be a positive finite number, got {length!r}")
        self.n = int(size)
        self.length = float(length)
        self.dealias = bool(dealias)
        # The dispersive part is integrated exactly; the explicit nonlinear part limits dt through
        # α·max|u|·k_max·dt with k_max ∝ 1/dx, so dt scales with dx on finer grids. At n=128,
        # L=40 with two solitons of amplitude ≤ 2 (overlap peaks ~3), 0.01 is stable but a
        # colliding pair drifts ~20 % (relative L2) from the converged solution by t = 10;
        # 0.005 keeps that below 1 % and ∫u² within ~3e-4.
        self.default_dt = 0.005 * min(1.0, (self.length / self.n) / (40.0 / 128))
        self._cache: KdVCoefficients | None = None

    # ----------------------------------------------------------------------------------------
    # shapes and coordinates
    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.n,)

    @property
    def state_dims(self) -> tuple[str, ...]:
        return ("x",)

    @property
    def dx(self) -> float:
        """Grid spacing L / n."""
        return self.length / self.n

    def state_coords(self) -> dict[str, torch.Tensor]:
        """Grid positions ``{"x": (n,)}`` = arange(n) · L / n (float64)."""
        return {"x": torch.arange(self.n, dtype=torch.float64) * self.dx}

    @property
    def ffts_per_step(self) -> int:
        """Real FFTs (forward or inverse, each over ``(B, n)``) in one :meth:`step`.

        One rfft brings the state to Fourier space and one irfft brings it back; each of the
        four nonlinear evaluations costs an irfft (û → u) and an rfft (u² → FFT(u²)). Without
        dealiasing the first stage's u is the input state itself, which saves one irfft.
        """
        return 10 if self.dealias else 9

    # ----------------------------------------------------------------------------------------
    # invariants
    def mass(self, u: torch.Tensor) -> torch.Tensor:
        """∫u dx, ``(B, n) -> (B,)``."""
        return mass(u, self.length)

    def momentum(self, u: torch.Tensor) -> torch.Tensor:
        """∫u² dx, ``(B, n) -> (B,)``."""
        return momentum(u, self.length)

    def hamiltonian(self, u: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """∫(δ/2 u_x² − α/6 u³) dx, ``u (B, n)``, ``theta (B, 2)`` → ``(B,)``."""
        return hamiltonian(u, theta, self.length)

    # ----------------------------------------------------------------------------------------
    # time stepping
    def _mask(self, device: torch.device) -> torch.Tensor | None:
        """2/3-rule mask over the rfft modes ``(n//2 + 1,)`` (real 0/1), or None without dealias."""
        if not self.dealias:
            return None
        j = torch.arange(self.n // 2 + 1, device=device)
        return (3 * j < self.n).to(torch.float64)

    def coefficients(
        self, theta: torch.Tensor, dt: float, dtype: torch.dtype, device: torch.device | str
    ) -> KdVCoefficients:
        """Per-member ETDRK4 coefficients, reused while (θ, dt, dtype, device) are unchanged.

        Computed in float64/complex128 on ``device`` and cast to the complex type matching
        ``dtype``. The contour integrals depend only on δ, so a change of α alone (e.g. in
        parameter estimation with δ fixed) only rebuilds the cheap nonlinear factor, and members
        that share a δ value share one contour evaluation.

        Args:
            theta: ``(B, 2)`` natural-space θ.
            dt: step size.
            dtype: real dtype of the state.
            device: device of the state.

        Returns:
            the cached coefficient set, tensors ``(B, n//2 + 1)``.
        """
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = theta.detach().to(device=device, dtype=torch.float64)
        c = self._cache
        same_setup = (c is not None and c.dt == dt and c.dtype == dtype and c.device == device
                      and c.theta.shape == key.shape)
        if same_setup and torch.equal(c.theta, key):
            return c
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        k = _odd_wavenumbers(self.n, self.length, device)
        mask = self._mask(device)
        g = (-0.5j * key[:, 0:1] * (k if mask is None else k * mask)).to(cdtype)  # (B, nk)
        if same_setup and torch.equal(c.theta[:, 1], key[:, 1]):
            phi = (c.E, c.E2, c.Q, c.f1, c.f2, c.f3)
        else:
            # δ is often shared by many members (an ensemble at the truth): evaluate once per value.
            delta_u, inverse = torch.unique(key[:, 1], return_inverse=True)
            hL = (1j * dt) * delta_u[:, None] * k**3  # (U, nk) complex128
            phi = tuple(t[inverse].to(cdtype) for t in etdrk4_coefficients(hL, dt))
        mask_c = None if mask is None else mask.to(dtype)
        self._cache = KdVCoefficients(key.clone(), dt, dtype, device, *phi, g, mask_c)
        return self._cache

    def step(self, x: torch.Tensor, theta: torch.Tensor, dt: float | None = None) -> torch.Tensor:
        """One ETDRK4 step for every member, ``x (B, n)``, ``theta (B, 2)`` → ``(B, n)``."""
        check_batch(x, theta, self.state_shape, len(self.params))
        dt = self.default_dt if dt is None else float(dt)
        c = self.coefficients(theta, dt, x.dtype, x.device)
        n, mask = self.n, c.mask

        def nonlinear(v: torch.Tensor) -> torch.Tensor:
            # N(v̂) = −(α/2) ik FFT(u²); with the 2/3 rule only low modes enter the product.
            u = torch.fft.irfft(v * mask if mask is not None else v, n=n, dim=-1)
            return c.g * torch.fft.rfft(u * u, dim=-1)

        v = torch.fft.rfft(x, dim=-1)
        nv = nonlinear(v) if mask is not None else c.g * torch.fft.rfft(x * x, dim=-1)
        a = c.E2 * v + c.Q * nv
        na = nonlinear(a)
        b = c.E2 * v + c.Q * na
        nb = nonlinear(b)
        cc = c.E2 * a + c.Q * (2.0 * nb - nv)
        nc = nonlinear(cc)
        v = c.E * v + c.f1 * nv + 2.0 * c.f2 * (na + nb) + c.f3 * nc
        return torch.fft.irfft(v, n=n, dim=-1)

    # ----------------------------------------------------------------------------------------
    # initial states
    def initial_state(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Two solitons per member, ``(batch, n)``.

        u = Σ_{i=1,2} A_i sech²(κ_i (x − x_i)) with A_i uniform in :attr:`amplitude_range`,
        x_i uniform on [0, L) and κ_i = sqrt(α A_i / (12 δ)) at the truth α, δ (each soliton
        is then an exact travelling wave of the true model). Drawn on the CPU in float64 so that
        CPU and CUDA runs start from identical states.
        """
        lo, hi = self.amplitude_range
        amp = lo + (hi - lo) * torch.rand(batch, 2, 1, generator=generator, dtype=torch.float64)
        x0 = self.length * torch.rand(batch, 2, 1, generator=generator, dtype=torch.float64)
        alpha, delta = (p.truth for p in self.params)
        u = soliton(self.state_coords()["x"], 0.0, amp, x0, alpha, delta, length=self.length)
        return u.sum(1).to(dtype=dtype, device=device)
