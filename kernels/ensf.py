"""Ensemble score filter (EnSF) analysis, after Bao, Zhang & Zhang (2024).

The prior ensemble ``x0 (N, D)`` defines a training-free score of the forward-diffused prior
``x_t = α_t x_0 + β_t ε`` with the schedule

    α_t = 1 − (1 − ε_α) t,        β_t² = ε_β + (1 − ε_β) t,        t ∈ [0, 1].

The posterior score is approximated by ``prior score + h(t) ∇ log p(y | x)`` with the damping
``h(t) = (1 − t)^p`` (``p = 1`` in the paper), and the reverse SDE

    dx = [f(t) x − g(t)² s(x, t)] dt + g(t) dw̄,    f = d log α_t / dt,    g² = dβ²/dt − 2 f β²,

is integrated by Euler–Maruyama from ``t = 1`` to ``t = 0`` on a uniform grid. Both estimators
write the prior score as ``(α_t m − x) / β_t²``: the *paired* one takes ``m = x0_i`` (particle
``i`` sees only prior member ``i``), the *mixture* one ``m = Σ_j w_j(x) x0_j``, the exact score
of the diffused empirical prior, with softmax weights over (a rotating subset of) the members.

Observations enter only through a caller-supplied callable returning ``∇_x log p(y | x)``
(zeros in components no observation touches, such as parameters θ). With the paired estimator
those components receive no information; :func:`regress_unobserved` carries the observed
increments over to them by ensemble regression (EnSF-LR style), and the mixture estimator moves
them implicitly by moving particles toward members whose observed part fits.

How close each estimator gets (measured by ``tests/test_ensf.py`` and stated there):

* *paired*: in the continuous-time limit the prior pull ``(α_t x0_i − x)/β_t²`` returns every
  particle exactly to ``x0_i`` at ``t = 0``; the update it makes is an O(Δt) discretisation
  effect, roughly one likelihood-gradient step ``Δt ∇ log p(y | x)`` plus ``√Δt`` jitter taken at
  the last pseudo-time step (``Δt = 1/steps``). It is therefore not a consistent posterior
  sampler: on a linear-Gaussian problem its mean moves from the prior toward the Kalman mean by
  an amount set by ``Δt/σ²`` (see the test docstring), which is why the step count and the
  observation error must be chosen together (``steps/σ²``-scaling). It is O(N·D) and works well
  in very high dimension, where the mixture weights degenerate.
* *mixture*: consistent with the Kalman answer on a linear-Gaussian problem within Monte-Carlo
  error for large ``N``; O(N·M·D) via GEMMs, chunked over ``D``.

Further options (``EnSFSettings``):

* ``estimator="gm"``: Gaussian-mixture prior, component ``j`` is ``N(μ_j, diag(h v))`` (``v`` the
  ensemble variance per state component, ``h = gm_bandwidth``, ``μ_j = x0_j`` or, with
  ``gm_shrink``, shrunk toward the mean so the mixture keeps variance ``v``); log-weights are
  GEMMs on ``1/(α² h v + β²)``-scaled columns, chunked over ``D``. ``estimator="gaussian"`` is its
  single-component limit ``N(m, diag(v))``: O(N·D), no weights, no weight degeneracy.
* ``likelihood="denoised"``: ``J ⊙ ∇ log p(y | μ_{0|t})`` at the Gaussian posterior mean
  ``μ_{0|t} = m (1 − α J) + x J``, ``J = α v/(α² v + β²)`` (DPS with a Gaussian prior); it needs
  no ``h(t)`` because ``J`` vanishes at ``t = 1`` and is 1 at ``t = 0``. On a linear-Gaussian
  problem it is near-exact for weak data (error O(v/σ²): within 2 Monte-Carlo s.e. of Kalman at
  v/σ² ≤ 0.25, where the damped form is 3–5 s.e. off) but not for strong data (mean shift 1.04–
  1.18 of Kalman's, variance 0.54–0.66 of it at v/σ² = 5–25; damped: 0.99–1.10, 0.59–0.63):
  both drop ``C_{0|t}`` from the likelihood covariance. The explicit step is stiff
  (``Δt·J²/σ²``): with σ = 0.05 it diverges unless ``score_clip`` (20–50) or ~500 steps.
* ``sampler="ode"``: probability-flow ODE (deterministic after ``x_1``); measured worse.

Which estimator when — Lorenz-96 (F = 8, RK4 dt = 0.01, arctan observations of every variable,
σ = 0.05, every 10 steps), N = 20, d = 1000, float64, 150 cycles, analysis RMSE averaged over the
last 50 (spread in brackets), CPU time per analysis on 1 thread of a shared 2-core machine:

    estimator  likelihood  clip  steps  init    RMSE (spread)      ms/analysis
    paired     damped      -       50   noise   1.25 (2.53)        140
    paired     damped      -      100   noise   1.03 (1.43)        295   (ε_β = 1e-3 for paired)
    paired     damped      -      200   noise   0.99 (0.95)        440
    paired     denoised    50     100   noise   2.07 (1.98)        125
    gaussian   damped      50     100   noise   0.42 (0.20)        250
    gaussian   denoised    -      100   noise   diverges           -
    gaussian   denoised    -      500   noise   0.25 (0.10)*       740   (*60 cycles)
    gaussian   denoised    50      50   prior   0.22–0.23 (0.31)   100   (seeds 0, 1)
    gaussian   denoised    50     100   prior   0.157–0.162 (0.18) 100–300 (seeds 0, 1)
                                                d = 10000: 0.169 (0.18)  1245
    gaussian   denoised    50     200   prior   0.169 (0.13)       335
    gaussian   denoised    20     100   noise   0.18–0.19 (0.17)   130   (10: 0.19, 5: 0.88)
    gaussian   denoised    20     100   noise   ode: 0.46 (0.13)   70
    gm h=1     denoised    20–50  100   noise   0.43 / diverges    150–270
    gm h=.5,.3 shrunk      -      100   noise   0.31 / diverges; 500 steps: 1.05
    mixture    denoised    20     100   noise   4.4                150

Recommended: ``EnSFSettings(estimator="gaussian", likelihood="denoised", score_clip=50,
init="prior", steps=100)`` (a per-variable Gaussian prior: in high dimension the mixture weights
of ``gm``/``mixture`` degenerate onto one member, and ``paired`` barely uses the data). Defaults
are unchanged (``paired``/``damped``) for compatibility.

Randomness: every particle draws its noise from its own ``torch.Generator`` (keyed by the
caller on (seed, cycle, member)), in blocks of pseudo-time steps whose length depends only on
``D`` and the settings, never on ``N``; with the paired estimator a particle's analysis is then
bitwise the same whatever batch it is computed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from kernels.ensemble import member_mean, member_sum, member_var

Estimator = Literal["paired", "mixture", "gm", "gaussian"]
Likelihood = Literal["damped", "denoised"]
Sampler = Literal["sde", "ode"]
Init = Literal["noise", "prior"]
LikelihoodGrad = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EnSFSettings:
    """Settings of one EnSF analysis.

    Attributes:
        steps: number of Euler–Maruyama pseudo-time steps ``N_t`` from ``t = 1`` to ``t = 0``.
        eps_alpha: ``α_1``, the signal fraction left at ``t = 1``; in ``(0, 1]``.
        eps_beta: ``β_0²``, the noise variance left at ``t = 0``; in ``[0, 1]``. With ``0`` the
            score is singular at ``t = 0``, which the scheme never evaluates (last point ``Δt``).
            A small value (1e-3) bounds the prior pull of the last steps and measurably helps
            on Lorenz-96 with arctan observations (analysis RMSE 1.28 → 1.0 at d = 1000).
        estimator: prior-score estimator: ``"paired"``, ``"mixture"`` (both: components of
            zero width), ``"gm"`` (Gaussian mixture, components ``N(μ_j, diag(h v))`` with ``v``
            the ensemble variance per state component and ``h`` = ``gm_bandwidth``), or
            ``"gaussian"`` (the single diagonal Gaussian ``N(m, diag(v))``, O(N·D), no weights).
        gm_bandwidth: ``h`` in the ``"gm"`` component variance ``h v``; ``> 0``.
        gm_shrink: shrink the ``"gm"`` component means to ``μ_j = m + √(1 − h)(x0_j − m)`` so the
            mixture keeps the ensemble variance (``h v + (1 − h) v``); needs ``h ≤ 1``. ``h = 1``
            then gives the ``"gaussian"`` prior, ``h → 0`` the empirical (``"mixture"``) one.
            Without shrinking the mixture variance is ``(1 + h) v``.
        likelihood: likelihood-score approximation. ``"damped"``: ``h(t) ∇ log p(y | x_t)``
            (the paper). ``"denoised"``: ``J ⊙ ∇ log p(y | μ_{0|t})`` with the Gaussian
            posterior mean ``μ_{0|t} = m (1 − α J) + x_t J``, ``J = α v / (α² v + β²)`` of the
            diagonal Gaussian fit ``(m, v)`` of the ensemble (DPS with a Gaussian prior).
        denoised_damping: with ``likelihood="denoised"``, still multiply by ``h(t)``.
        sampler: ``"sde"`` (Euler–Maruyama on the reverse SDE) or ``"ode"`` (Euler on the
            probability-flow ODE ``dx = [f x − ½ g² s] dt``, noise only in the start ``x_1``).
        mixture_size: members ``M`` per mixture evaluation; ``None`` uses all ``N``. A smaller
            ``M`` takes a different contiguous (cyclic) block of members at each step so that
            all members are used equally over the pseudo-time loop, without any shared RNG.
        score_clip: bound on ``|∇ log p(y | x)|`` per component, or ``None``. The explicit
            scheme moves a particle by ``g² Δt h ∇ log p`` per step; far from the data (large
            residuals over small σ, or the ``1/σ²`` factor near the steep part of arctan or
            saturation operators) that step overshoots by orders of magnitude and the iteration
            diverges. Clipping bounds the per-step displacement.
        h_power: ``p`` in the likelihood damping ``h(t) = max(1 − t, 0)^p``; ``1`` is the paper.
        init: start of the reverse SDE. ``"noise"`` (the paper's choice) draws ``x_1 ~ N(0, I)``,
            which ignores the small ``α_1 x0`` part of the true ``t = 1`` marginal;
            ``"prior"`` starts exactly on it, ``x_1 = α_1 x0_i + β_1 ε``.
        chunk: columns of ``D`` per chunk in the mixture GEMMs and in
            :func:`regress_unobserved`, bounding temporaries to ``O(N·chunk)``.
        noise_block: elements of noise drawn per member at once (several pseudo-time steps per
            draw amortise the per-member loop); the block length in steps depends only on ``D``.
    """

    steps: int = 100
    eps_alpha: float = 0.05
    eps_beta: float = 0.0
    estimator: Estimator = "paired"
    mixture_size: int | None = None
    gm_bandwidth: float = 1.0
    gm_shrink: bool = False
    likelihood: Likelihood = "damped"
    denoised_damping: bool = False
    sampler: Sampler = "sde"
    score_clip: float | None = None
    h_power: float = 1.0
    init: Init = "noise"
    chunk: int = 1 << 16
    noise_block: int = 1 << 22

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not 0.0 < self.eps_alpha <= 1.0:
            raise ValueError(f"eps_alpha must lie in (0, 1], got {self.eps_alpha!r}")
        if not 0.0 <= self.eps_beta <= 1.0:
            raise ValueError(f"eps_beta must lie in [0, 1], got {self.eps_beta!r}")
        if self.estimator not in ("paired", "mixture", "gm", "gaussian"):
            raise ValueError(
                f"estimator must be 'paired', 'mixture', 'gm' or 'gaussian', got {self.estimator!r}"
            )
        if not (self.gm_bandwidth > 0.0 and math.isfinite(self.gm_bandwidth)):
            raise ValueError(f"gm_bandwidth must be a finite number > 0, got {self.gm_bandwidth!r}")
        if self.gm_shrink and self.gm_bandwidth > 1.0:
            raise ValueError(f"gm_shrink needs gm_bandwidth <= 1, got {self.gm_bandwidth!r}")
        if self.likelihood not in ("damped", "denoised"):
            raise ValueError(f"likelihood must be 'damped' or 'denoised', got {self.likelihood!r}")
        if self.sampler not in ("sde", "ode"):
            raise ValueError(f"sampler must be 'sde' or 'ode', got {self.sampler!r}")
        if self.mixture_size is not None and (int(self.mixture_size) != self.mixture_size
                                              or self.mixture_size < 1):
            raise ValueError(f"mixture_size must be a positive integer or None, got {self.mixture_size!r}")
        if self.score_clip is not None and not self.score_clip > 0.0:
            raise ValueError(f"score_clip must be positive or None, got {self.score_clip!r}")
        if not (self.h_power >= 0.0 and math.isfinite(self.h_power)):
            raise ValueError(f"h_power must be a finite number >= 0, got {self.h_power!r}")
        if self.init not in ("noise", "prior"):
            raise ValueError(f"init must be 'noise' or 'prior', got {self.init!r}")
        if int(self.chunk) != self.chunk or self.chunk < 1:
            raise ValueError(f"chunk must be a positive integer, got {self.chunk!r}")
        if int(self.noise_block) != self.noise_block or self.noise_block < 1:
            raise ValueError(f"noise_block must be a positive integer, got {self.noise_block!r}")


# --------------------------------------------------------------------------------------------
# schedule
def schedule(t: float, eps_alpha: float, eps_beta: float) -> tuple[float, float, float, float]:
    """Forward schedule and reverse-SDE coefficients at pseudo-time ``t``.

    Returns:
        ``(α_t, β_t², f_t, g_t²)`` with ``f = d log α / dt`` and ``g² = dβ²/dt − 2 f β²``.
    """
    alpha = 1.0 - (1.0 - eps_alpha) * t
    beta2 = eps_beta + (1.0 - eps_beta) * t
    f = -(1.0 - eps_alpha) / alpha
    g2 = (1.0 - eps_beta) - 2.0 * f * beta2
    return alpha, beta2, f, g2


def likelihood_weight(t: float, power: float = 1.0) -> float:
    """The damping ``h(t) = max(1 − t, 0)^power`` of the likelihood score."""
    return max(1.0 - t, 0.0) ** power


# --------------------------------------------------------------------------------------------
# prior scores
def paired_score(x: torch.Tensor, x0: torch.Tensor, alpha: float, beta2: float) -> torch.Tensor:
    """Paired prior score ``−(x_i − α x0_i) / β²``; ``x, x0 (N, D) -> (N, D)``."""
    return (alpha * x0 - x) / beta2


def mixture_logits(
    x: torch.Tensor,
    x0: torch.Tensor,
    alpha: float,
    beta2: float,
    *,
    chunk: int | None = None,
    x0_sqnorm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unnormalised log-weights of the diffused empirical prior, up to a per-row constant.

    ``−|x_i − α x0_j|² / (2β²)`` expands to ``(α x_i·x0_j − α²|x0_j|²/2)/β² − |x_i|²/(2β²)``;
    the last term is the same for every ``j`` and cancels in the softmax, so it is dropped. That
    also removes the cancellation of two huge terms when ``x`` is far from every member.

    Args:
        x: particles ``(N, D)``.
        x0: prior members ``(M, D)``.
        alpha, beta2: ``α_t`` and ``β_t²``.
        chunk: columns per GEMM chunk (``None``: one GEMM).
        x0_sqnorm: precomputed ``|x0_j|²`` ``(M,)``.

    Returns:
        ``(N, M)`` logits.
    """
    n, d = x.shape
    chunk = d if chunk is None else max(1, int(chunk))
    if x0_sqnorm is None:
        x0_sqnorm = _sqnorm(x0, chunk)
    # the bias and scale ride along in the GEMMs: one pass over the (N, M) result per chunk
    scale = alpha / beta2
    logits = (x0_sqnorm * (-0.5 * alpha * scale)).expand(n, -1).contiguous()
    for c in range(0, d, chunk):
        logits.addmm_(x[:, c:c + chunk], x0[:, c:c + chunk].T, alpha=scale)
    return logits


def mixture_weights(
    x: torch.Tensor,
    x0: torch.Tensor,
    alpha: float,
    beta2: float,
    *,
    chunk: int | None = None,
    x0_sqnorm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Posterior responsibilities ``w_ij = softmax_j(−|x_i − α x0_j|² / (2β²))``, ``(N, M)``.

    The softmax subtracts each row's maximum, so the weights stay finite and sum to one even
    when every distance is huge (the nearest member then gets weight one).
    """
    return torch.softmax(mixture_logits(x, x0, alpha, beta2, chunk=chunk, x0_sqnorm=x0_sqnorm), dim=1)


def mixture_score(
    x: torch.Tensor,
    x0: torch.Tensor,
    alpha: float,
    beta2: float,
    *,
    chunk: int | None = None,
    x0_sqnorm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score of the diffused empirical prior ``Σ_j w_j (α x0_j − x) / β²``.

    Args:
        x: particles ``(N, D)``.
        x0: prior members ``(M, D)``.

    Returns:
        ``(N, D)``.
    """
    d = x.shape[1]
    chunk = d if chunk is None else max(1, int(chunk))
    w = mixture_weights(x, x0, alpha, beta2, chunk=chunk, x0_sqnorm=x0_sqnorm)
    out = torch.empty_like(x)
    for c in range(0, d, chunk):
        out[:, c:c + chunk] = (alpha * (w @ x0[:, c:c + chunk]) - x[:, c:c + chunk]) / beta2
    return out


def gm_logits(
    x: torch.Tensor,
    means: torch.Tensor,
    alpha: float,
    var_t: torch.Tensor,
    *,
    chunk: int | None = None,
) -> torch.Tensor:
    """Log-weights of the diffused Gaussian mixture ``Σ_j N(α μ_j, diag(var_t))``, up to a row constant.

    ``−Σ_d (x_d − α μ_jd)² / (2 s_d)`` with ``s = var_t`` expands to
    ``α (x/s)·μ_j − (α²/2) (μ_j²)·(1/s) − Σ_d x_d²/(2 s_d)``; the last term is the same for every
    ``j`` and is dropped (it cancels in the softmax and would cancel catastrophically against the
    others for particles far from every component). Both remaining terms are GEMMs after scaling
    the columns by ``1/s``, accumulated over column chunks of ``D``.

    Args:
        x: particles ``(N, D)``.
        means: component means ``(M, D)`` (before the ``α`` scaling).
        alpha: ``α_t``.
        var_t: diffused component variance ``α² h v + β²`` per state component, ``(D,)``.
        chunk: columns per chunk (``None``: one pass).

    Returns:
        ``(N, M)`` logits.
    """
    n, d = x.shape
    chunk = d if chunk is None else max(1, int(chunk))
    logits = x.new_zeros(n, means.shape[0])
    bias = x.new_zeros(1, means.shape[0])
    for c in range(0, d, chunk):
        cols = slice(c, c + chunk)
        inv = var_t[cols].reciprocal()
        mu = means[:, cols]
        logits.addmm_(x[:, cols] * inv, mu.T, alpha=alpha)
        bias.addmm_(inv[None], (mu * mu).T, alpha=-0.5 * alpha * alpha)
    return logits + bias


def gm_weights(
    x: torch.Tensor, means: torch.Tensor, alpha: float, var_t: torch.Tensor, *, chunk: int | None = None
) -> torch.Tensor:
    """Responsibilities ``(N, M)`` of the diffused Gaussian mixture; rows sum to one even when
    every distance is huge (softmax after subtracting the row maximum)."""
    return torch.softmax(gm_logits(x, means, alpha, var_t, chunk=chunk), dim=1)


def gm_score(
    x: torch.Tensor, means: torch.Tensor, alpha: float, var_t: torch.Tensor, *, chunk: int | None = None
) -> torch.Tensor:
    """Score ``Σ_j w_j (α μ_j − x) / var_t`` of the diffused Gaussian mixture, ``(N, D)``."""
    d = x.shape[1]
    chunk = d if chunk is None else max(1, int(chunk))
    w = gm_weights(x, means, alpha, var_t, chunk=chunk)
    out = torch.empty_like(x)
    for c in range(0, d, chunk):
        cols = slice(c, c + chunk)
        out[:, cols] = (alpha * (w @ means[:, cols]) - x[:, cols]) / var_t[cols]
    return out


def gm_components(x0: torch.Tensor, bandwidth: float = 1.0, shrink: bool = False,
                  stats: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Means ``(N, D)``, component variance ``h v`` ``(D,)`` and ensemble ``(m, v)`` of the GM prior.

    ``stats``: the ensemble ``(m, v)`` computed elsewhere (a distributed analysis holds only
    some members in ``x0``); otherwise from ``x0`` in the fixed order of :mod:`kernels.ensemble`.
    """
    if stats is None:
        m = member_mean(x0)
        v = member_var(x0, m, correction=1 if x0.shape[0] > 1 else 0)
    else:
        m, v = stats
    means = m + math.sqrt(1.0 - bandwidth) * (x0 - m) if shrink else x0
    return means, bandwidth * v, m, v


def denoised_mean(
    x: torch.Tensor, m: torch.Tensor, v: torch.Tensor, alpha: float, beta2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian posterior mean ``E[x_0 | x_t] = m (1 − α J) + x_t J`` and ``J = α v/(α² v + β²)``
    under the prior ``N(m, diag(v))``; returns ``(μ_{0|t} (N, D), J (D,))``."""
    jac = v * alpha / (alpha * alpha * v + beta2)
    return m * (1.0 - alpha * jac) + x * jac, jac


def _sqnorm(a: torch.Tensor, chunk: int) -> torch.Tensor:
    """Row norms squared ``(M,)`` of ``a (M, D)``, accumulated over column chunks."""
    out = a.new_zeros(a.shape[0])
    for c in range(0, a.shape[1], chunk):
        part = a[:, c:c + chunk]
        out += (part * part).sum(1)
    return out


# --------------------------------------------------------------------------------------------
# noise
def _noise_blocks(
    generators: Sequence[torch.Generator],
    total: int,
    d: int,
    block_elems: int,
    dtype: torch.dtype,
    device: torch.device,
):
    """Yield ``(N, k, D)`` blocks of standard normals covering ``total`` vectors per member.

    The block length ``k`` depends only on ``D`` and ``block_elems``: how ``torch.randn``
    consumes a generator depends on the size of the request, so a member's numbers are the same
    in any batch only if its requests are.
    """
    k = max(1, min(total, block_elems // max(d, 1)))
    gdev = generators[0].device
    for start in range(0, total, k):
        kb = min(k, total - start)
        buf = torch.empty(len(generators), kb, d, dtype=dtype, device=gdev)
        for i, g in enumerate(generators):
            torch.randn(kb, d, generator=g, dtype=dtype, device=gdev, out=buf[i])
        yield buf.to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------
# analysis
def ensf_analysis(
    x0: torch.Tensor,
    likelihood_grad: LikelihoodGrad,
    settings: EnSFSettings,
    generators: Sequence[torch.Generator],
    *,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One EnSF analysis: sample the approximate posterior by the reverse SDE.

    Args:
        x0: prior (forecast) ensemble ``(N, D)``, flattened state with θ appended in its
            unconstrained transform; floating dtype, any device.
        likelihood_grad: ``x (N, D) -> ∇_x log p(y | x) (N, D)``, zero in components no
            observation touches; must not modify ``x``. For the paired estimator's batch
            independence it must act on each row independently.
        settings: :class:`EnSFSettings`.
        generators: one ``torch.Generator`` per particle, all on one device (CPU generators draw
            on the CPU in the working dtype and the noise is moved to ``x0.device``).
        stats: mean and variance ``(D,)`` of the *whole* prior ensemble when ``x0`` holds only
            some of its members (a rank's slice). Enough for ``paired`` and ``gaussian``, whose
            particles interact only through these; ``mixture``/``gm`` need every member in ``x0``.

    Returns:
        Posterior ensemble ``(N, D)``, dtype and device of ``x0``.
    """
    if x0.ndim != 2 or not x0.is_floating_point():
        raise ValueError(f"x0 must be a floating (N, D) tensor, got {tuple(x0.shape)} {x0.dtype}")
    n, d = x0.shape
    if len(generators) != n:
        raise ValueError(f"need one generator per particle: {len(generators)} for N = {n}")
    if len({g.device for g in generators}) > 1:
        raise ValueError("all generators must live on the same device")
    s = settings
    est = s.estimator
    if stats is not None and est in ("mixture", "gm"):
        raise ValueError(f"the {est} estimator needs every prior member, not summary stats")
    mixture = est == "mixture"
    gm = est in ("gm", "gaussian")
    ode = s.sampler == "ode"
    denoised = s.likelihood == "denoised"
    m_size = n if s.mixture_size is None else min(int(s.mixture_size), n)
    x0_sqnorm = _sqnorm(x0, s.chunk) if mixture else None
    means = comp_var = None
    if gm or denoised:
        bw = 1.0 if est == "gaussian" else s.gm_bandwidth
        shrink = est == "gaussian" or s.gm_shrink
        means, comp_var, ens_mean, ens_var = gm_components(x0, bw, shrink, stats)
        if est == "gaussian" or (shrink and bw == 1.0):
            gm_single = True  # every component is N(m, v): no weights needed
        else:
            gm_single = False
    dt = 1.0 / s.steps
    sqrt_dt = math.sqrt(dt)
    c_drift = 0.5 if ode else 1.0  # probability-flow ODE: half the score, no noise

    # noise vector 0 starts the reverse process, vectors 1..steps drive the SDE's steps
    blocks = _noise_blocks(generators, 1 if ode else s.steps + 1, d, s.noise_block, x0.dtype, x0.device)
    block = next(blocks)
    pos = 0
    z0 = block[:, 0]
    if s.init == "noise":
        x = z0.clone()
    else:
        alpha1, beta2_1, _, _ = schedule(1.0, s.eps_alpha, s.eps_beta)
        x = alpha1 * (means if gm else x0) + math.sqrt(beta2_1) * z0
    pos = 1

    for k in range(s.steps):
        z = None
        if not ode:
            if pos == block.shape[1]:
                block = next(blocks)
                pos = 0
            z = block[:, pos]
            pos += 1

        t = 1.0 - k * dt
        alpha, beta2, f, g2 = schedule(t, s.eps_alpha, s.eps_beta)
        h = likelihood_weight(t, s.h_power)
        a_z = 0.0 if ode else math.sqrt(g2) * sqrt_dt

        # likelihood term: raw gradient times a_l (damped) or J ⊙ gradient at μ_{0|t} (denoised)
        lik = None
        a_l = c_drift * g2 * dt * h
        if denoised:
            a_l = c_drift * g2 * dt * (h if s.denoised_damping else 1.0)
        if a_l != 0.0:
            point, jac = denoised_mean(x, ens_mean, ens_var, alpha, beta2) if denoised else (x, None)
            lik = likelihood_grad(point)
            if lik.shape != x.shape:
                raise ValueError(f"likelihood_grad returned {tuple(lik.shape)}; expected {tuple(x.shape)}")
            if s.score_clip is not None:
                lik = lik.clamp(-s.score_clip, s.score_clip)
            if jac is not None:
                lik = lik * jac

        if gm:
            var_t = alpha * alpha * comp_var + beta2
            w = members = None
            if not gm_single:
                if m_size == n:
                    members = means
                else:
                    idx = (torch.arange(m_size, device=x0.device) + k * m_size) % n
                    members = means.index_select(0, idx)
                w = gm_weights(x, members, alpha, var_t, chunk=s.chunk)
            a_s = c_drift * g2 * dt
            for c in range(0, d, s.chunk):
                cols = slice(c, c + s.chunk)
                xc = x[:, cols]
                mc = ens_mean[cols] if gm_single else w @ members[:, cols]
                prior = (alpha * mc - xc) / var_t[cols]
                out = xc * (1.0 - f * dt)
                out += prior * a_s
                if lik is not None:
                    out += lik[:, cols] * a_l
                if z is not None:
                    out += z[:, cols] * a_z
                x[:, cols] = out
            continue

        # paired / mixture: x ← x(1 − fΔ) + c g²Δ [(α m − x)/β² + lik] + g√Δ z, one fused update
        a_x = 1.0 - f * dt - c_drift * g2 * dt / beta2
        a_m = c_drift * g2 * dt * alpha / beta2

        if not mixture:
            x = _affine(x, x0, lik, z, a_x, a_m, a_l, a_z)
            continue

        if m_size == n:
            members, sq = x0, x0_sqnorm
        else:
            # a cyclic block of members per step: all members used equally, no shared RNG
            idx = (torch.arange(m_size, device=x0.device) + k * m_size) % n
            members, sq = x0.index_select(0, idx), x0_sqnorm.index_select(0, idx)
        w = mixture_weights(x, members, alpha, beta2, chunk=s.chunk, x0_sqnorm=sq)
        for c in range(0, d, s.chunk):
            cols = slice(c, c + s.chunk)
            x[:, cols] = _affine(x[:, cols], w @ members[:, cols], None if lik is None else lik[:, cols],
                                 None if z is None else z[:, cols], a_x, a_m, a_l, a_z)
    return x


def _affine(
    x: torch.Tensor,
    m: torch.Tensor,
    lik: torch.Tensor | None,
    z: torch.Tensor | None,
    a_x: float,
    a_m: float,
    a_l: float,
    a_z: float,
) -> torch.Tensor:
    """``a_x x + a_m m + a_l lik + a_z z`` elementwise (a new tensor).

    Plain multiplies and adds, not ``add(..., alpha=)``: the vectorised CPU kernel of the latter
    fuses into an FMA while its scalar tail does not, so an element's rounding would depend on
    its position in the batch and break the paired estimator's batch independence.
    """
    out = x * a_x
    out += m * a_m
    if lik is not None:
        out += lik * a_l
    if z is not None:
        out += z * a_z
    return out


# --------------------------------------------------------------------------------------------
# ensemble post-processing
def inflate(ens: torch.Tensor, factor: float, mean: torch.Tensor | None = None) -> torch.Tensor:
    """Multiplicative inflation about the ensemble mean; ``(N, D) -> (N, D)``.

    ``mean``: the ``(D,)`` mean of the whole ensemble when ``ens`` is one rank's members.
    """
    mean = member_mean(ens) if mean is None else mean
    return mean + factor * (ens - mean)


def rtps(prior: torch.Tensor, posterior: torch.Tensor, alpha: float) -> torch.Tensor:
    """Relaxation to prior spread (Whitaker & Hamill 2012).

    Scales the posterior anomalies of each component by ``1 + α (σ_b − σ_a)/σ_a``, restoring a
    fraction ``α`` of the spread the analysis removed.

    Args:
        prior, posterior: ``(N, D)`` ensembles.
        alpha: relaxation fraction, usually in ``[0, 1]``.

    Returns:
        ``(N, D)``. Components with no posterior spread are left unchanged (σ_a clamped away
        from zero only to avoid 0/0; their anomalies are zero anyway).
    """
    mean = member_mean(posterior)
    sa = member_var(posterior, mean).sqrt()
    sb = member_var(prior).sqrt()
    tiny = torch.finfo(posterior.dtype).tiny
    factor = 1.0 + alpha * (sb - sa) / sa.clamp_min(tiny)
    return mean + factor * (posterior - mean)


def regress_unobserved(
    prior: torch.Tensor,
    posterior: torch.Tensor,
    observed: torch.Tensor,
    ridge: float = 1e-6,
    *,
    chunk: int = 1 << 16,
) -> torch.Tensor:
    """Carry observed increments over to unobserved components by ensemble regression.

    Observed components keep the EnSF posterior. Unobserved ones (θ, unobserved grid points)
    are regressed on the observed prior anomalies, ``B ≈ A K`` with ridge, and move by ``δ K``;
    in ensemble space (push-through identity) that is

        W = δ Aᵀ (A Aᵀ + λ I)⁻¹   (N × N),     unobserved increment = W B,

    with ``A (N, r)`` the observed prior anomalies, ``δ (N, r)`` the observed increments and
    ``B`` the unobserved prior anomalies. Only ``N × N`` matrices are formed, chunked over D.

    Args:
        prior, posterior: ``(N, D)`` ensembles.
        observed: ``(D,)`` bool mask of observed components.
        ridge: ``λ`` relative to the mean eigenvalue ``tr(A Aᵀ)/N``, so it is unit-free.
            ``0`` uses the pseudo-inverse (``A Aᵀ`` is always singular: anomalies sum to zero).
        chunk: columns of ``D`` per chunk.

    Returns:
        ``(N, D)``.
    """
    if prior.shape != posterior.shape or prior.ndim != 2:
        raise ValueError(
            f"prior {tuple(prior.shape)} and posterior {tuple(posterior.shape)} must be equal (N, D)"
        )
    n, d = prior.shape
    observed = observed.to(device=prior.device, dtype=torch.bool)
    if observed.shape != (d,):
        raise ValueError(f"observed must be a (D,) = ({d},) bool mask, got {tuple(observed.shape)}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    out = posterior.clone()
    if bool(observed.all()) or not bool(observed.any()):
        return out  # nothing to regress on, or nothing to update
    mean = member_mean(prior)
    spans = [slice(c, c + chunk) for c in range(0, d, chunk)]
    parts = [regression_partials(prior[:, sp], posterior[:, sp], mean[sp], observed[sp])
             for sp in spans]
    w = regression_weights(member_sum(torch.stack([g for g, _ in parts])),
                           member_sum(torch.stack([x for _, x in parts])), ridge)
    for sp in spans:
        regression_apply(prior[:, sp], out[:, sp], mean[sp], observed[sp], w)
    return out


def regression_partials(
    prior: torch.Tensor, posterior: torch.Tensor, mean: torch.Tensor, observed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One column block's share ``(A Aᵀ, A δᵀ)``, each ``(N, N)``, of :func:`regress_unobserved`.

    Args:
        prior, posterior: ``(N, C)`` columns of the ensembles (every member).
        mean: ``(C,)`` prior mean of these columns.
        observed: ``(C,)`` bool.
    """
    a = (prior - mean)[:, observed]
    delta = (posterior - prior)[:, observed]
    return a @ a.T, a @ delta.T


def regression_weights(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ensemble-space regression weights ``W = δ Aᵀ (A Aᵀ + λ I)⁻¹`` ``(N, N)`` from the summed
    blocks of :func:`regression_partials` (``λ = ridge · tr(A Aᵀ)/N``; 0: pseudo-inverse)."""
    n = gram.shape[0]
    if ridge > 0:
        lam = ridge * torch.diagonal(gram).sum() / n
        chol = torch.linalg.cholesky(gram + lam * torch.eye(n, dtype=gram.dtype, device=gram.device))
        return torch.cholesky_solve(cross, chol).T  # (G + λI)⁻¹ A δᵀ, transposed
    return (torch.linalg.pinv(gram, hermitian=True) @ cross).T


def regression_apply(
    prior: torch.Tensor, out: torch.Tensor, mean: torch.Tensor, observed: torch.Tensor,
    w: torch.Tensor,
) -> None:
    """Set the unobserved columns of ``out (N, C)`` (in place) to ``prior + W B``, ``B`` their
    prior anomalies; observed columns are left as they are."""
    mask = ~observed
    if bool(mask.any()):
        b = (prior - mean)[:, mask]
        out[:, mask] = prior[:, mask] + w @ b


def regress_local(
    prior: torch.Tensor,
    posterior: torch.Tensor,
    observed_cols: torch.Tensor,
    target_cols: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    ridge: float = 1e-3,
    *,
    chunk: int = 4096,
) -> torch.Tensor:
    """Localized ensemble regression of unobserved grid points on nearby observed increments.

    With few members, the global regression of :func:`regress_unobserved` couples every
    unobserved component to every observed one through sampling noise; with a fraction of a
    spatial field observed that noise swamps the signal (a partially observed Lorenz-96 ring
    loses the truth). Here target column ``j`` is regressed only on its local observed columns
    ``l ∈ L_j`` with a distance-dependent ridge,

        k_j = argmin_k ‖b_j − A_j k‖² + Σ_l λ_j / ρ_jl · k_l²,     λ_j = ridge · tr(A_jᵀA_j)/|L_j|,

    i.e. a zero-mean Gaussian prior on the coefficient of column ``l`` whose variance falls with
    the Gaspari–Cohn taper ``ρ_jl`` (ρ = 0: coefficient exactly 0). Then column ``j`` moves by
    ``δ_j k_j`` per member. ``A_j (N, L)``, ``δ_j (N, L)`` are the local observed prior anomalies
    and increments, ``b_j (N,)`` the target's prior anomalies. One ``L × L`` solve per target,
    batched; cost ``O(D_t · N · L²)``.

    Args:
        prior, posterior: ``(N, D)`` ensembles.
        observed_cols: ``(m,)`` int64 columns of the observed components (the regressors).
        target_cols: ``(G,)`` int64 columns to update (unobserved, located components).
        index: ``(G, L)`` int64 positions in ``observed_cols`` of each target's local regressors
            (:func:`kernels.letkf.build_local_obs`; padding may point anywhere).
        weight: ``(G, L)`` taper weights in ``[0, 1]``; 0 marks padding / out of range.
        ridge: relative ridge ``> 0`` (the L × L system must stay non-singular with ``N < L``).
        chunk: targets solved at once (bounds temporaries to ``O(chunk · N · L)``).

    Returns:
        ``(N, D)``: ``posterior`` with the target columns replaced by ``prior + δ_j k_j``.
    """
    if prior.shape != posterior.shape or prior.ndim != 2:
        raise ValueError(
            f"prior {tuple(prior.shape)} and posterior {tuple(posterior.shape)} must be equal (N, D)"
        )
    if index.shape != weight.shape or index.ndim != 2 or index.shape[0] != target_cols.shape[0]:
        raise ValueError(f"index {tuple(index.shape)} and weight {tuple(weight.shape)} must be "
                         f"(G, L) with G = {target_cols.shape[0]} targets")
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0 for the localized regression, got {ridge}")
    out = posterior.clone()
    if target_cols.numel() == 0 or index.shape[1] == 0:
        return out
    dev = prior.device
    observed_cols, target_cols = observed_cols.to(dev), target_cols.to(dev)
    index, weight = index.to(dev), weight.to(device=dev, dtype=prior.dtype)
    mean = member_mean(prior)
    a_all = (prior - mean)[:, observed_cols]                          # (N, m)
    d_all = (posterior - prior)[:, observed_cols]                     # (N, m)
    b_all = (prior - mean)[:, target_cols]                            # (N, G)
    tiny = torch.finfo(prior.dtype).tiny
    for s in range(0, target_cols.shape[0], chunk):
        idx, w = index[s:s + chunk], weight[s:s + chunk]              # (g, L)
        live = w > 0
        a = a_all[:, idx] * live                                      # (N, g, L), padding zeroed
        gram = torch.einsum("ngl,ngk->glk", a, a)                     # (g, L, L)
        rhs = torch.einsum("ngl,ng->gl", a, b_all[:, s:s + chunk])    # (g, L)
        scale = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1) / live.sum(-1).clamp_min(1)
        # ρ → 0 means an infinite penalty; padding gets a unit diagonal so the system stays
        # regular (its column of A is zero, so its coefficient is exactly 0 either way)
        pen = torch.where(live, ridge * scale.clamp_min(tiny)[:, None] / w.clamp_min(tiny),
                          torch.ones_like(w))
        coef = torch.linalg.solve(gram + torch.diag_embed(pen), rhs.unsqueeze(-1)).squeeze(-1)
        inc = torch.einsum("ngl,gl->ng", d_all[:, idx] * live, coef)  # (N, g)
        out[:, target_cols[s:s + chunk]] = prior[:, target_cols[s:s + chunk]] + inc
    return out
