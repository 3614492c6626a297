"""Ensemble Kalman analyses: LETKF batched over grid points, global ETKF, stochastic EnKF.

All analyses are pure functions of the forecast ensemble ``Xf (N, D)``, the observed ensemble
``HXf (N, m)`` (so observation operators may be nonlinear), the observations ``y (m,)`` and their
standard deviations (diagonal R). The square-root filters follow Hunt, Kostelich & Szunyogh (2007):
the analysis is solved in the N-dimensional ensemble space, with the symmetric square root so that
the analysis ensemble stays centred on the analysis mean and close to the forecast ensemble.

The LETKF solves one such N×N problem per grid point. Grid points are processed in chunks of G:
for each point the observations inside the Gaspari–Cohn support are gathered into a fixed-width
padded table (``LocalObs``, padding has zero weight), so a chunk is a handful of batched matmuls
and one batched ``torch.linalg.eigh`` on ``(G, N, N)``; there is no Python loop over grid points or
members, and memory is bounded by the chunk size even for D ~ 1e6.

Inflation convention (as in DAPPER): ``inflation`` multiplies the prior anomalies (of the state and
of the observed ensemble), i.e. the prior covariance is multiplied by ``inflation²``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

__all__ = [
    "LocalObs",
    "build_local_obs",
    "enkf_stochastic",
    "etkf_analysis",
    "gaspari_cohn",
    "letkf_analysis",
    "periodic_distance",
]

Std = float | torch.Tensor


# ------------------------------------------------------------------------------------------------
# localization helpers
def gaspari_cohn(r: torch.Tensor) -> torch.Tensor:
    """Gaspari–Cohn (1999) fifth-order piecewise-rational taper, eq. (4.10).

    Args:
        r: distance divided by the localization half-width ``c``, any shape (sign is ignored).

    Returns:
        Weights of the same shape: 1 at 0, compactly supported on ``|r| < 2``, C²-smooth
        enough that the tapered covariance stays positive semi-definite.
    """
    r = r.abs()
    inner = (((-0.25 * r + 0.5) * r + 0.625) * r - 5.0 / 3.0) * r * r + 1.0
    # the outer branch has a 1/r term: evaluate it on r clamped to [1, 2] so r -> 0 cannot divide
    ro = r.clamp(1.0, 2.0)
    outer = ((((ro / 12.0 - 0.5) * ro + 0.625) * ro + 5.0 / 3.0) * ro - 5.0) * ro + 4.0 - 2.0 / (3.0 * ro)
    w = torch.where(r <= 1.0, inner, outer)
    return torch.where(r < 2.0, w, torch.zeros_like(w)).clamp_min(0.0)


def periodic_distance(a: torch.Tensor, b: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
    """Euclidean distance on a periodic domain (a ring for k=1, a torus for k=2), in grid units.

    Args:
        a: positions ``(..., k)``.
        b: positions ``(..., k)``, broadcastable against ``a``.
        extent: period along each axis ``(k,)`` (e.g. ``(d,)`` for a ring of d points).

    Returns:
        ``(...)`` distances; per axis the shorter way round the period is taken.
    """
    extent = torch.as_tensor(extent, dtype=a.dtype, device=a.device)
    delta = torch.remainder(a - b, extent)
    delta = torch.minimum(delta, extent - delta)
    return torch.linalg.vector_norm(delta, dim=-1)


@dataclass(frozen=True)
class LocalObs:
    """The local observations of every grid point, padded to a fixed width ``L``.

    Attributes:
        index: ``(D, L)`` int64 observation indices; padding entries point at observation 0.
        weight: ``(D, L)`` Gaspari–Cohn weights (the R⁻¹ taper); 0 exactly on padding.
    """

    index: torch.Tensor
    weight: torch.Tensor

    @property
    def width(self) -> int:
        return int(self.index.shape[-1])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LocalObs:
        return LocalObs(self.index.to(device=device), self.weight.to(device=device, dtype=dtype))


class _CellIndex:
    """Observations binned into periodic cells at least one support (2c) wide.

    Any observation within the support of a grid point lies in the point's cell or in one of its
    3^k neighbours, so candidates are gathered from a few cells instead of all m observations.
    With a support wider than the domain this degenerates to one cell (all observations).
    """

    def __init__(self, obs_locations: torch.Tensor, extent: torch.Tensor, support: float) -> None:
        k = obs_locations.shape[-1]
        device = obs_locations.device
        self.extent = extent
        self.n_cells = torch.clamp(torch.floor(extent / support), min=1).long()
        self.width = extent / self.n_cells
        self.strides = torch.ones(k, dtype=torch.long, device=device)
        for axis in range(k - 2, -1, -1):
            self.strides[axis] = self.strides[axis + 1] * self.n_cells[axis + 1]
        flat = self._flat(self._cell(obs_locations))
        self.order = torch.argsort(flat, stable=True)
        self.counts = torch.bincount(flat, minlength=int(self.n_cells.prod()))
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        # with fewer than 3 cells along an axis, ±1 would visit a cell twice: visit each once
        per_axis = [(-1, 0, 1) if n >= 3 else tuple(range(n)) for n in self.n_cells.tolist()]
        self.offsets = torch.tensor(list(itertools.product(*per_axis)), dtype=torch.long, device=device)

    def _cell(self, loc: torch.Tensor) -> torch.Tensor:
        cell = torch.floor(torch.remainder(loc, self.extent) / self.width).long()
        return torch.minimum(cell, self.n_cells - 1)  # guard round-off at the upper edge

    def _flat(self, cell: torch.Tensor) -> torch.Tensor:
        return (cell * self.strides).sum(-1)

    def candidates(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate observation indices ``(G, C)`` and a validity mask ``(G, C)`` for ``points (G, k)``."""
        cells = torch.remainder(self._cell(points)[:, None, :] + self.offsets, self.n_cells)
        flat = self._flat(cells)  # (G, n_off)
        cnt = self.counts[flat]
        cum = torch.cumsum(cnt, -1)
        total = cum[:, -1]
        width = int(total.max()) if total.numel() else 0
        j = torch.arange(width, device=points.device).expand(points.shape[0], width).contiguous()
        # which neighbour cell the j-th candidate comes from, then its position inside that cell
        which = torch.searchsorted(cum, j, right=True).clamp_max(cnt.shape[-1] - 1)
        pos = self.starts[flat].gather(1, which) + j - (cum - cnt).gather(1, which)
        valid = j < total[:, None]
        pos = torch.where(valid, pos, torch.zeros_like(pos))
        if self.order.numel() == 0:
            return pos, valid
        return self.order[pos], valid


def _local_obs_chunk(
    cells: _CellIndex,
    points: torch.Tensor,
    obs_locations: torch.Tensor,
    radius: float,
) -> LocalObs:
    """``LocalObs`` for one chunk of grid points, padded to the chunk's own widest support."""
    idx, valid = cells.candidates(points)
    dist = periodic_distance(points[:, None, :], obs_locations[idx], cells.extent)
    w = torch.where(valid, gaspari_cohn(dist / radius), torch.zeros_like(dist))
    width = int((w > 0).sum(-1).max()) if w.numel() else 0
    # keep only the observations with positive weight: the widest count sets the padding
    w, keep = torch.topk(w, width, dim=-1)
    return LocalObs(idx.gather(1, keep), w)


def build_local_obs(
    grid_locations: torch.Tensor,
    obs_locations: torch.Tensor,
    extent: torch.Tensor | tuple[float, ...],
    radius: float,
    *,
    chunk: int = 8192,
) -> LocalObs:
    """Precompute every grid point's local observations and Gaspari–Cohn weights.

    Worth caching when the observation network is fixed over cycles. Memory is ``D × L`` where
    ``L`` is the largest number of observations within ``2 · radius`` of any grid point.

    Args:
        grid_locations: ``(D, k)`` grid-point positions in grid units.
        obs_locations: ``(m, k)`` observation positions in the same units.
        extent: ``(k,)`` domain period along each axis.
        radius: localization half-width ``c`` (the taper vanishes beyond ``2c``).
        chunk: grid points processed at once while searching.

    Returns:
        ``LocalObs`` with ``index``/``weight`` of shape ``(D, L)``.
    """
    extent_t = torch.as_tensor(extent, dtype=grid_locations.dtype, device=grid_locations.device)
    obs_locations = obs_locations.to(grid_locations.dtype)
    cells = _CellIndex(obs_locations, extent_t, 2.0 * float(radius))
    parts = [
        _local_obs_chunk(cells, grid_locations[s : s + chunk], obs_locations, float(radius))
        for s in range(0, grid_locations.shape[0], chunk)
    ]
    width = max((p.width for p in parts), default=0)
    pad = [(torch.nn.functional.pad(p.index, (0, width - p.width)),
            torch.nn.functional.pad(p.weight, (0, width - p.width))) for p in parts]
    if not pad:
        empty = grid_locations.new_zeros((0, 0))
        return LocalObs(empty.long(), empty)
    return LocalObs(torch.cat([i for i, _ in pad]), torch.cat([w for _, w in pad]))


# ------------------------------------------------------------------------------------------------
# ensemble-space algebra shared by the square-root filters
def _obs_inverse_variance(obs_std: Std, m: int, like: torch.Tensor) -> torch.Tensor:
    std = torch.as_tensor(obs_std, dtype=like.dtype, device=like.device)
    return std.expand(m).reciprocal().square()


def _transform(y_anom: torch.Tensor, rinv: torch.Tensor, innov: torch.Tensor) -> torch.Tensor:
    """The symmetric square-root ETKF transform, batched.

    Args:
        y_anom: observed anomalies ``(..., L, N)`` (transposed so observations gather as rows).
        rinv: tapered inverse observation variances ``(..., L)``.
        innov: innovations ``y − mean(HXf)`` ``(..., L)``.

    Returns:
        ``T (..., N, N)`` with ``T[k, n] = w̄_k + W_kn``: member n of the analysis is
        ``x̄ + Σ_k A_k T[k, n]`` for prior anomalies ``A (N, ·)``.
    """
    n = y_anom.shape[-1]
    c = y_anom * rinv[..., None]
    # Pa~⁻¹ = (N−1) I + Yᵀ R⁻¹ Y: symmetric with eigenvalues ≥ N−1, so eigh is well conditioned
    m = c.transpose(-1, -2) @ y_anom
    m = 0.5 * (m + m.transpose(-1, -2))
    m.diagonal(dim1=-2, dim2=-1).add_(n - 1)
    lam, v = torch.linalg.eigh(m)
    rhs = (c * innov[..., None]).sum(-2)  # Yᵀ R⁻¹ d, (..., N)
    w_mean = v @ ((v.transpose(-1, -2) @ rhs[..., None]) / lam[..., None])  # (..., N, 1)
    w_sqrt = (v * torch.sqrt((n - 1) / lam)[..., None, :]) @ v.transpose(-1, -2)
    return w_sqrt + w_mean


def _split_prior(
    Xf: torch.Tensor, HXf: torch.Tensor, y: torch.Tensor, inflation: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if Xf.ndim != 2 or HXf.ndim != 2 or HXf.shape[0] != Xf.shape[0]:
        raise ValueError(f"expected Xf (N, D) and HXf (N, m); got {tuple(Xf.shape)}, {tuple(HXf.shape)}")
    if y.shape != HXf.shape[1:]:
        raise ValueError(f"y has shape {tuple(y.shape)}; expected ({HXf.shape[1]},)")
    if Xf.shape[0] < 2:
        raise ValueError("an ensemble analysis needs at least 2 members")
    if inflation < 1.0:
        raise ValueError(f"inflation must be >= 1, got {inflation}")
    HXf = HXf.to(Xf.dtype)
    xbar = Xf.mean(0)
    ybar = HXf.mean(0)
    a = (Xf - xbar) * inflation
    ya = (HXf - ybar) * inflation
    return xbar, a, ya, y.to(Xf.dtype) - ybar


def _global_columns(global_columns: int | torch.Tensor | None, d: int, device: torch.device) -> torch.Tensor:
    if global_columns is None:
        return torch.zeros(0, dtype=torch.long, device=device)
    if isinstance(global_columns, int):
        if not 0 <= global_columns <= d:
            raise ValueError(f"global_columns={global_columns} outside [0, {d}]")
        return torch.arange(d - global_columns, d, device=device)
    cols = torch.as_tensor(global_columns, device=device).long().reshape(-1)
    return torch.remainder(cols, d).unique()


# ------------------------------------------------------------------------------------------------
# analyses
def letkf_analysis(
    Xf: torch.Tensor,
    HXf: torch.Tensor,
    y: torch.Tensor,
    obs_std: Std,
    grid_locations: torch.Tensor | None = None,
    obs_locations: torch.Tensor | None = None,
    extent: torch.Tensor | tuple[float, ...] | None = None,
    radius: float | None = None,
    inflation: float = 1.0,
    chunk: int = 2048,
    *,
    local_obs: LocalObs | None = None,
    global_columns: int | torch.Tensor | None = None,
    global_rho: Std = 1.0,
) -> torch.Tensor:
    """Local ensemble transform Kalman filter (symmetric square root), batched over grid points.

    Each located state column ``g`` is updated with the observations within ``2 · radius`` of it,
    their inverse variances tapered by Gaspari–Cohn weights (R-localization). Columns without a
    location (parameters θ appended to the state) are updated with one global transform using all
    observations, their R⁻¹ scaled by ``global_rho``.

    Args:
        Xf: forecast ensemble ``(N, D)``.
        HXf: observed forecast ensemble ``(N, m)`` (any, possibly nonlinear, operator).
        y: observations ``(m,)``.
        obs_std: observation-error standard deviations, a float or ``(m,)``.
        grid_locations: ``(D_loc, k)`` positions of the located columns, in column order, where
            ``D_loc = D − number of global columns``. Not needed when ``radius`` is None.
        obs_locations: ``(m, k)`` observation positions. Not needed with ``local_obs`` or no radius.
        extent: ``(k,)`` periods of the domain (``(d,)`` for a ring, ``(nx, ny)`` for a torus).
        radius: localization half-width ``c`` in grid units; None means no localization (every
            column uses all observations: the global ETKF).
        inflation: multiplicative inflation (≥ 1) of the prior anomalies.
        chunk: grid points per batch; peak memory is about ``chunk · N · (L + 3N)`` elements.
        local_obs: precomputed ``build_local_obs(...)`` for the located columns (reuse it while the
            observation network is fixed); built chunk by chunk on the fly when omitted.
        global_columns: columns without location: an int ``n`` for the last ``n`` columns, or a
            tensor of column indices.
        global_rho: R⁻¹ multiplier (float or ``(m,)``) for the global columns; 1 uses all
            observations at full weight.

    Returns:
        Analysis ensemble ``(N, D)``, same dtype and device as ``Xf``.
    """
    xbar, a, ya, innov = _split_prior(Xf, HXf, y, inflation)
    n_mem, d = Xf.shape
    m = HXf.shape[1]
    rinv = _obs_inverse_variance(obs_std, m, Xf)
    yt = ya.T.contiguous()  # (m, N): local observations are gathered as rows
    xa = torch.empty_like(Xf)

    gcols = _global_columns(global_columns, d, Xf.device)
    is_global = torch.zeros(d, dtype=torch.bool, device=Xf.device)
    is_global[gcols] = True
    located = torch.nonzero(~is_global).squeeze(-1)

    if gcols.numel():
        rho = torch.as_tensor(global_rho, dtype=Xf.dtype, device=Xf.device)
        t = _transform(yt, rinv * rho, innov)
        xa[:, gcols] = xbar[gcols] + t.T @ a[:, gcols]

    n_loc = located.numel()
    if n_loc == 0:
        return xa
    if radius is None and local_obs is None:
        # no localization: one transform serves every located column (the global ETKF)
        t = _transform(yt, rinv, innov)
        xa[:, located] = xbar[located] + t.T @ a[:, located]
        return xa
    if local_obs is None:
        if grid_locations is None or obs_locations is None or extent is None:
            raise ValueError("localization needs grid_locations, obs_locations and extent (or local_obs)")
        if grid_locations.shape[0] != n_loc:
            raise ValueError(f"grid_locations has {grid_locations.shape[0]} rows; {n_loc} located columns")
        loc_dtype = torch.float64 if Xf.dtype == torch.float64 else torch.float32
        grid_locations = grid_locations.to(device=Xf.device, dtype=loc_dtype)
        obs_locations = obs_locations.to(device=Xf.device, dtype=loc_dtype)
        extent_t = torch.as_tensor(extent, dtype=loc_dtype, device=Xf.device)
        cells = _CellIndex(obs_locations, extent_t, 2.0 * float(radius))
    elif local_obs.index.shape[0] != n_loc:
        raise ValueError(f"local_obs covers {local_obs.index.shape[0]} points; {n_loc} located columns")

    for s in range(0, n_loc, chunk):
        cols = located[s : s + chunk]
        if local_obs is None:
            lo = _local_obs_chunk(cells, grid_locations[s : s + chunk], obs_locations, float(radius))
        else:
            lo = LocalObs(local_obs.index[s : s + chunk], local_obs.weight[s : s + chunk])
        idx = lo.index.to(Xf.device)
        w = lo.weight.to(device=Xf.device, dtype=Xf.dtype)
        t = _transform(yt[idx], rinv[idx] * w, innov[idx])  # (G, N, N)
        # member n at point g: x̄_g + Σ_k A[k, g] T[g, k, n]
        xa[:, cols] = xbar[cols] + torch.einsum("kg,gkn->ng", a[:, cols], t)
    return xa


def etkf_analysis(
    Xf: torch.Tensor,
    HXf: torch.Tensor,
    y: torch.Tensor,
    obs_std: Std,
    inflation: float = 1.0,
) -> torch.Tensor:
    """Global ETKF with the symmetric square root, in closed form via one SVD.

    With ``S = R^{-1/2} Yᵀ / √(N−1)`` (``Y`` the observed anomalies) and ``S = U Σ Vᵀ``:
    ``W = U (I + Σ²)^{-1/2} Uᵀ`` and ``w̄ = U (I + Σ²)^{-1} Σ Vᵀ R^{-1/2} d / √(N−1)``. This route
    (SVD instead of the eigen-decomposition of ``(N−1) I + Y R⁻¹ Yᵀ``) is independent of the LETKF
    code, which is what makes it a useful reference.

    Args:
        Xf: forecast ensemble ``(N, D)``.
        HXf: observed forecast ensemble ``(N, m)``.
        y: observations ``(m,)``.
        obs_std: float or ``(m,)``.
        inflation: multiplicative inflation (≥ 1) of the prior anomalies.

    Returns:
        Analysis ensemble ``(N, D)``.
    """
    xbar, a, ya, innov = _split_prior(Xf, HXf, y, inflation)
    n_mem = Xf.shape[0]
    r_isqrt = _obs_inverse_variance(obs_std, HXf.shape[1], Xf).sqrt()
    s = ya * r_isqrt / math.sqrt(n_mem - 1)  # (N, m)
    u, sig, vh = torch.linalg.svd(s, full_matrices=True)
    # pad the singular values to N: directions of ensemble space that observations do not see
    sig_n = torch.zeros(n_mem, dtype=Xf.dtype, device=Xf.device)
    sig_n[: sig.numel()] = sig
    proj = vh[: sig.numel()] @ (r_isqrt * innov)  # Vᵀ R^{-1/2} d, (min(N, m),)
    coef = torch.zeros_like(sig_n)
    coef[: sig.numel()] = sig / (1 + sig.square()) * proj
    w_mean = u @ coef / math.sqrt(n_mem - 1)
    w_sqrt = (u * (1 + sig_n.square()).rsqrt()) @ u.T
    t = w_sqrt + w_mean[:, None]
    return xbar + t.T @ a


def enkf_stochastic(
    Xf: torch.Tensor,
    HXf: torch.Tensor,
    y: torch.Tensor,
    obs_std: Std,
    perturbations: torch.Tensor,
    inflation: float = 1.0,
    *,
    center: bool = True,
) -> torch.Tensor:
    """Stochastic EnKF with perturbed observations (Burgers et al. 1998), gain in ensemble space.

    Member n is nudged towards ``y + σ ε_n``. The gain ``K = Aᵀ Y (Yᵀ Y + (N−1) R)⁻¹`` is applied
    through the push-through identity ``Y (YᵀY + R̃)⁻¹ = (I_N + Y R̃⁻¹ Yᵀ)⁻¹ Y R̃⁻¹``
    (``R̃ = (N−1) R``, diagonal), so only N×N systems are solved: O(N² (m + D)) work and no D×D
    matrix. When there are fewer observations than members the m×m system ``YᵀY + R̃`` is solved
    instead (O(N m (m + D)), no N×N matrix).

    Args:
        Xf: forecast ensemble ``(N, D)``.
        HXf: observed forecast ensemble ``(N, m)``.
        y: observations ``(m,)``.
        obs_std: float or ``(m,)``.
        perturbations: standard-normal draws ``(N, m)``, scaled by ``obs_std`` here. Draw row n
            from member n's own random stream so that results do not depend on the rank layout.
        inflation: multiplicative inflation (≥ 1) of the prior anomalies.
        center: remove the ensemble mean of the perturbations (rescaled by √(N/(N−1)) to keep
            their variance), so the analysis mean is not biased by sampling noise.

    Returns:
        Analysis ensemble ``(N, D)``.
    """
    xbar, a, ya, _ = _split_prior(Xf, HXf, y, inflation)
    n_mem, m = HXf.shape
    if perturbations.shape != (n_mem, m):
        raise ValueError(f"perturbations have shape {tuple(perturbations.shape)}; expected ({n_mem}, {m})")
    std = torch.as_tensor(obs_std, dtype=Xf.dtype, device=Xf.device).expand(m)
    eps = perturbations.to(Xf.dtype)
    if center:
        eps = (eps - eps.mean(0)) * math.sqrt(n_mem / (n_mem - 1))
    # innovations of every member against its own perturbed observations, from inflated members
    hx = HXf.to(Xf.dtype).mean(0) + ya
    innov = y.to(Xf.dtype) + std * eps - hx  # (N, m)
    r_tilde = (n_mem - 1) * std.square()
    if m < n_mem:
        # few observations, many members: solve the m×m innovation covariance instead
        s = ya.T @ ya
        s = 0.5 * (s + s.T)
        s.diagonal().add_(r_tilde)
        z = torch.cholesky_solve(innov.T, torch.linalg.cholesky(s))  # (m, N)
        return xbar + a + z.T @ (ya.T @ a)
    c = ya / r_tilde  # Y R̃⁻¹, (N, m)
    gram = c @ ya.T
    gram = 0.5 * (gram + gram.T)
    gram.diagonal().add_(1.0)  # I + Y R̃⁻¹ Yᵀ, eigenvalues ≥ 1
    coef = torch.cholesky_solve(c @ innov.T, torch.linalg.cholesky(gram))  # (N_k, N_members)
    return xbar + a + coef.T @ a
