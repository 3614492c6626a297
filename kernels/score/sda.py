"""Score-based data assimilation (Rozet & Louppe, 2023) with parameters θ in the state.

Composition. A window network predicts the noise ``ε̂`` of ``W = 2k + 1`` consecutive augmented
states ``(x_i, θ_i)``. For a Markov chain of order ≤ k the score of a whole trajectory
``x_{1:L}`` is, to a good approximation, assembled from the scores of its windows
(:func:`composed_eps`): state ``i`` takes the centre output of the window centred at ``i``; the
first ``k`` states take positions ``0..k−1`` of the first window and the last ``k`` states
positions ``k+1..2k`` of the last window. For a Gaussian Markov chain the assembly is exact in
the clean limit (the precision of the chain is banded) and the error grows with the noise level
and shrinks with ``k`` (measured in ``tests/test_sda_kernels.py``).

Posterior sampling (:func:`sample_posterior`), everything in normalised space, with the VP
schedule ``x_t = μ_t x_0 + σ_t ε``:

* *likelihood*: with the Tweedie estimate ``x̂_0(x_t) = (x_t − σ_t ε̂(x_t)) / μ_t`` and a
  caller-supplied ``observe`` (``x̂_0 ↦`` predicted observations),

      log p(y | x_t) ≈ log N(y | observe(x̂_0(x_t)), σ_y² + γ (σ_t / μ_t)²)

  whose gradient with respect to ``x_t`` is taken by autograd *through the denoiser*; the
  posterior noise is ``ε_post = ε̂ − σ_t ∇_{x_t} log p(y | x_t)`` (:func:`posterior_eps`).
  In physical observation units the ``γ`` term is ``γ (σ_t/μ_t)² H V Hᵀ``
  (:func:`likelihood_scale`): diagonal for point and block observations, a full per-frame
  :class:`FrameCovariance` where observations share state components.
* *constraints*: a field whose spatial mean is zero in every state has ``x̂_0`` projected onto
  it (:func:`mean_projection`), ``ε`` made consistent with the projection.
* *predictor*: exponential-integrator (DDIM) step from ``t`` to ``s = t − Δt``,

      x_s = r x_t + (√(σ_s² − c²) − r σ_t) ε_post + c z,    r = μ_s / μ_t,

  with ``c = η_ddim σ_s σ_{t|s} / σ_t``, ``σ_{t|s}² = σ_t² − (μ_t/μ_s)² σ_s²``: ``η_ddim = 0``
  is SDA's deterministic step, ``η_ddim = 1`` the ancestral (DDPM) step.
* *corrector*: ``C`` Langevin steps at ``s`` with SDA's step-size rule,

      δ = τ / mean(ε_post²),    x ← x − σ_s (δ ε_post + √(2δ) z),

  i.e. Langevin ``x ← x + h ∇log p + √(2h) z`` with ``h = δ σ_s² = τ / mean(‖∇log p‖²)``; the
  mean runs over every entry (state and θ) of one sample, so each sample gets its own step.

The reverse process starts from ``x_1 ~ N(0, I)`` on the grid ``t_j = 1 − j/steps`` and returns
``x`` at ``t = 0`` (σ_0 = η of the schedule, negligible).

Randomness: sample ``b`` draws all its noise from ``generators[b]``, in blocks whose length
depends only on the size of one sample and ``noise_block``, never on the batch. As long as
``eps_fn`` and ``observe`` act on each sample independently (no batch statistics), a sample's
result is the same alone or in any batch up to floating-point reassociation in batched kernels.
Measured: bitwise equal on the CPU (float64 and float32, analytic test networks); on an H200 with
a ring network not bitwise, since cuDNN picks its convolution algorithm (TF32 by default) by
batch size: one composed ε differs by ~2.5e-5 in float32 between a batch of 8 and a subset of
3, by ~1e-16 relative in float64; sampling then carries such differences along.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kernels.score.denoiser import Normalizer
from kernels.score.schedule import VPSchedule

#: ``(x_state (B, W, C, *sp), x_theta (B, W, P), t (B,)) -> (ε_state, ε_theta)``, same shapes.
EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
#: ``(x̂0_state (B, L, C, *sp), x̂0_theta (B, L, P))`` (normalised) ``-> (B, m)`` predicted observations.
ObserveFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``x̂0_state (B, L, C, *sp) -> (B, L, C, *sp)`` (normalised): the projection onto the states the
#: data can take (:func:`mean_projection`).
StateProjection = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "EpsFn",
    "FrameCovariance",
    "ObserveFn",
    "SDASettings",
    "StateProjection",
    "composed_eps",
    "composed_score",
    "likelihood_scale",
    "make_window_observe",
    "mean_projection",
    "posterior_eps",
    "sample_posterior",
    "sample_theta_given_states",
    "trajectory_eps",
]


# ------------------------------------------------------------------------------------------------
# composition of window scores
def _batch_t(t: torch.Tensor | float, batch: int, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or of shape ({batch},), got {tuple(t.shape)}")
    return t


def composed_eps(
    eps_fn: EpsFn,
    x_state: torch.Tensor,
    x_theta: torch.Tensor,
    t: torch.Tensor | float,
    window: int,
    *,
    chunk: int | None = None,
    static_theta: bool = False,
    schedule: VPSchedule | None = None,
    theta_fd: float = 0.1,
    theta_prior: tuple[torch.Tensor, torch.Tensor] | None = None,
    evidence_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise prediction of whole trajectories assembled from a window network.

    All ``L − 2k`` windows of all ``B`` trajectories go through ``eps_fn`` in one batched call
    (or in calls of at most ``chunk`` windows). Interior state ``i`` takes the centre output of
    the window centred at ``i``; states ``0..k−1`` take positions ``0..k−1`` of the first window
    and states ``L−k..L−1`` positions ``k+1..2k`` of the last one. θ is assembled the same way.

    Args:
        eps_fn: window noise predictor, e.g. ``WindowDenoiser.eps``; must treat windows
            independently (no batch statistics).
        x_state: diffused trajectories ``(B, L, C, *spatial)``.
        x_theta: their parameters ``(B, L, P)``; ``P = 0`` allowed.
        t: diffusion time, scalar or ``(B,)``.
        window: ``W = 2k + 1``, odd, ``1 ≤ W ≤ L``.
        chunk: most windows per ``eps_fn`` call (bounds memory); ``None`` for one call.
        static_theta: treat θ as **one** parameter vector per trajectory (``x_theta (B, 1, P)``,
            returned ``(B, 1, P)``): every window sees it at all W positions. Its ε is the
            evidence composition below when ``schedule`` is given, else the mean over windows
            of their centre outputs. Per-frame θ (the default) suits a θ that moves (a random
            walk); with a static θ the per-frame copies of distant windows drift apart and the
            sampler diverges (measured on Lorenz-96, L ≥ 17, W = 5: states beyond 100 in
            normalised units).
        schedule: the network's noise schedule; with ``static_theta`` it selects the evidence
            composition of θ (see below).
        theta_fd: finite-difference step of the evidence composition, in units of ``σ_t``.
        theta_prior: ``(mean (P,), std (P,))`` of the training prior of normalised θ; with
            ``static_theta`` and ``schedule`` it selects the shared composition (below), for a
            network trained with one θ noise per window (``theta_noise: shared``).
        evidence_scale: ``c`` in ``0 < c ≤ 1``, the shared and evidence compositions weight
            each window's evidence ``c/W`` instead of ``1/W`` (tempering, below); refused
            (``ValueError``) below 1 where θ has no evidence composition.

    Static θ, shared composition. A network trained on windows whose θ copies share one noise
    draw (the sampling situation) returns at every position ``ε̂_j ≈ −σ_t ∇_θ log p_t(x^j, θ_t)``
    of window ``j``. The trajectory's θ score adds each window's evidence over the prior,
    ``∇ log p(θ) + Σ_j w (∇ log p(x^j, θ) − ∇ log p(θ))``, with ``w = 1/W`` (every interior
    frame lies in W windows); in ε form ``ε = ε_p + (1/W) Σ_j (ε̄_j − ε_p)`` with ``ε̄_j`` the
    window's output averaged over its W positions and ``ε_p = σ_t (θ_t − μ_t m)/(μ_t² s² + σ_t²)``
    the Gaussian prior ``N(m, s²)``'s. One window pass, no finite differences.

    Tempering. ``1/W`` counts every transition ``(W − 1)/W`` times but also each window's
    evidence from the marginal of its states, ``n`` windows of it weighted ``1/W`` where the
    exact chain likelihood has one: ``n/W`` times. Where consecutive states are nearly the same
    (slow variables) those marginal evidences repeat one another and the θ posterior is too
    narrow; ``evidence_scale`` ``c < 1`` tempers the windows' evidence to ``c/W`` (the prior
    keeps its weight). Not derived from the network: measured on twin windows (docs/smooth.md).

    Static θ, evidence composition. The window network was trained on W copies of θ noised
    independently, so shown one shared copy ``θ_t`` at all W positions it reads it as a copy
    with noise ``σ_t²/W`` and under-shrinks (the pooled mean of centre outputs gives posterior
    and prior spreads of θ far too wide: 2.3× and 1.6× on the analytic chain). Per parameter and
    window j, a Gaussian reading of the network's estimate ``θ̂_j = E[θ_0 | window, θ̄ = θ_t]`` and
    of its slope ``k_j = ∂θ̂_j/∂(θ_t/μ_t)`` (one finite difference, no gradient) gives the window's
    own evidence on θ: posterior ``N(m_j, v_j)`` with ``v_j = k_j r/(W(1 − k_j))``,
    ``m_j = (θ̂_j − k_j θ_t/μ_t)/(1 − k_j)``, ``r = σ_t²/μ_t²``. The trajectory's estimate adds, in
    information form, the prior ``N(0, 1)`` of normalised θ, each window's evidence over the
    prior weighted ``1/W`` (every interior frame lies in W windows) and ``θ_t`` itself at its
    true noise ``r``; ``ε_θ = (θ_t − μ_t θ̂)/σ_t``. Parameters are combined one by one (their
    cross-correlations within a window are left out). Exact up to that overlap weighting for a
    Gaussian chain: on the analytic θ + noise chain, posterior mean 0.856 and sd 0.57 against
    Kalman 0.868 / 0.51, prior sd 1.02 (tests). Costs P extra window passes without gradient.

    Returns:
        ``ε_state (B, L, C, *spatial)`` and ``ε_theta (B, L, P)`` (``(B, 1, P)`` with
        ``static_theta``); differentiable through ``eps_fn`` with respect to the inputs.
    """
    if static_theta:
        if x_theta.dim() != 3 or x_theta.shape[1] != 1:
            raise ValueError(f"static θ must be (B, 1, P), got {tuple(x_theta.shape)}")
        x_theta = x_theta.expand(-1, x_state.shape[1], -1)
    if x_state.dim() < 3 or x_theta.dim() != 3 or x_theta.shape[:2] != x_state.shape[:2]:
        raise ValueError(f"need x_state (B, L, C, *spatial) and x_theta (B, L, P), got "
                         f"{tuple(x_state.shape)} and {tuple(x_theta.shape)}")
    b, length = x_state.shape[:2]
    if isinstance(window, bool) or int(window) != window or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd positive integer, got {window!r}")
    if window > length:
        raise ValueError(f"window {window} is longer than the trajectory (L = {length})")
    if chunk is not None and (isinstance(chunk, bool) or int(chunk) != chunk or chunk < 1):
        raise ValueError(f"chunk must be a positive integer or None, got {chunk!r}")
    if not 0.0 < evidence_scale <= 1.0:
        raise ValueError(f"evidence_scale must be in (0, 1], got {evidence_scale!r}")
    w, k = int(window), int(window) // 2
    we = w / evidence_scale  # the evidence weight c/W as a divisor
    n = length - 2 * k  # windows per trajectory
    tb = _batch_t(t, b, x_state)

    # (B, n, C, *sp, W) and (B, n, P, W) views; windows are gathered chunk by chunk, so the
    # W-fold copy only ever exists for one chunk
    us = x_state.unfold(1, w, 1)
    ut = x_theta.unfold(1, w, 1)
    out_s = x_state.new_empty(x_state.shape)
    out_t = x_theta.new_empty(x_theta.shape)
    p = x_theta.shape[2]
    pooled = x_theta.new_zeros(b, p)  # static θ: Σ over windows of the mean copy ε
    shared = static_theta and schedule is not None and theta_prior is not None and p > 0
    evidence = static_theta and schedule is not None and theta_prior is None and p > 0
    if evidence_scale != 1.0 and not (shared or evidence):
        # the pooled mean and per-frame θ weight no window's evidence: a c < 1 would be ignored
        raise ValueError("evidence_scale < 1 needs a static θ composed from windows' evidence "
                         "(static_theta with schedule, and P > 0)")
    if shared:
        mu_b, sig_b = (v.to(x_theta) for v in schedule.mu_sigma_theta(tb, tb))
        window_sum = x_theta.new_zeros(b, p)  # Σ_j ε̄_j
    if evidence:
        mu_b, sig_b = (v.to(x_theta) for v in schedule.mu_sigma_theta(tb, tb))
        info = x_theta.new_zeros(b, p)   # Σ_j (1/v_j − 1)        (prior N(0, 1))
        minfo = x_theta.new_zeros(b, p)  # Σ_j m_j / v_j
    total = b * n
    step = total if chunk is None else int(chunk)
    for start in range(0, total, step):
        idx = torch.arange(start, min(start + step, total), device=x_state.device)
        bi, ji = idx // n, idx % n
        ws, wt = us[bi, ji].movedim(-1, 1), ut[bi, ji].movedim(-1, 1)
        es, et = eps_fn(ws, wt, tb[bi])
        if es.shape != ws.shape or et.shape != wt.shape:
            raise ValueError(f"eps_fn returned {tuple(es.shape)}, {tuple(et.shape)}; expected "
                             f"{tuple(ws.shape)}, {tuple(wt.shape)}")
        out_s[bi, ji + k], out_t[bi, ji + k] = es[:, k], et[:, k]
        if static_theta:
            pooled = pooled.index_add(0, bi, et[:, k])
        if shared:
            window_sum = window_sum.index_add(0, bi, et.mean(1))
        if evidence:
            i_j, m_j = _window_evidence(eps_fn, ws, wt, et[:, k], tb[bi], mu_b[bi], sig_b[bi], w,
                                        theta_fd)
            info, minfo = info.index_add(0, bi, i_j), minfo.index_add(0, bi, m_j)
        first, last = ji == 0, ji == n - 1
        if k and bool(first.any()):
            out_s[bi[first], :k], out_t[bi[first], :k] = es[first, :k], et[first, :k]
        if k and bool(last.any()):
            out_s[bi[last], length - k:] = es[last, k + 1:]
            out_t[bi[last], length - k:] = et[last, k + 1:]
    if shared:
        c = x_theta[:, 0]  # (B, P): the shared θ_t
        mu, sig = mu_b[:, None], sig_b[:, None]
        m0, s0 = (v.to(x_theta).reshape(1, -1) for v in theta_prior)  # type: ignore[union-attr]
        e_prior = sig * (c - mu * m0) / (mu * mu * s0 * s0 + sig * sig)
        return out_s, (e_prior + (window_sum - n * e_prior) / we).unsqueeze(1)
    if evidence:
        c = x_theta[:, 0]  # (B, P): the shared θ_t
        mu, sig = mu_b[:, None], sig_b[:, None]
        r = (sig / mu) ** 2  # noise variance of θ_t / μ_t about θ_0
        prec = 1.0 + info / we + 1.0 / r
        theta_hat = (minfo / we + c / (mu * r)) / prec
        return out_s, ((c - mu * theta_hat) / sig).unsqueeze(1)
    if static_theta:
        # The mean over windows: the prior the states put on θ counts as one window's. Counting
        # each transition once instead (s_prior + Σ_j (s_j − s_prior)/(W − 1)) makes the θ score
        # up to n/(W − 1) times stiffer and the sampler diverges at 64–128 steps (Lorenz-96,
        # L = 17 and 32). What the observations say about θ still comes from every frame: the
        # likelihood gradient flows through θ into each window's denoised states. On the
        # analytic θ + noise chain: posterior mean right, spread 2.3× too wide (tests).
        return out_s, (pooled / n).unsqueeze(1)
    return out_s, out_t


def _window_evidence(
    eps_fn: EpsFn, ws: torch.Tensor, wt: torch.Tensor, et_centre: torch.Tensor, tw: torch.Tensor,
    mu: torch.Tensor, sig: torch.Tensor, w: int, fd: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of windows' evidence on a static θ (:func:`composed_eps`): ``(1/v_j − 1,
    m_j / v_j)``, each ``(G, P)``, zero where a window reads no evidence (``1/v_j ≤ 1``).

    ``ws``, ``wt``: the windows (θ the same at all W positions), ``et_centre (G, P)`` their
    centre θ outputs, ``tw``, ``mu``, ``sig`` ``(G,)``.
    """
    k = w // 2
    mu, sig = mu[:, None], sig[:, None]
    y = wt[:, k] / mu                                  # θ_t / μ_t
    theta_hat = y - sig * et_centre / mu               # E[θ_0 | window, θ̄ = θ_t]
    slope = torch.empty_like(theta_hat)
    h = fd * sig[:, 0]                                 # (G,)
    with torch.no_grad():  # the slope is a local constant of the Gaussian reading
        for q in range(wt.shape[2]):
            shifted = wt.clone()
            shifted[:, :, q] += h[:, None]
            _, e1 = eps_fn(ws, shifted, tw)
            hat1 = (shifted[:, k, q] - sig[:, 0] * e1[:, k, q]) / mu[:, 0]
            slope[:, q] = (hat1 - theta_hat[:, q].detach()) / (h / mu[:, 0])
    # a slope outside (0, 1) is no Gaussian reading (network error): clamp, and drop below
    kk = slope.clamp(1e-4, 1.0 - 1e-4)
    r_w = (sig / mu) ** 2 / w                          # the network's belief: θ̄ noise σ²/W
    inv_v = (1.0 - kk) / (kk * r_w)
    m = (theta_hat - kk * y) / (1.0 - kk)
    keep = inv_v > 1.0
    zero = torch.zeros_like(inv_v)
    return torch.where(keep, inv_v - 1.0, zero), torch.where(keep, m * inv_v, zero)


def trajectory_eps(eps_fn: EpsFn, window: int, *, chunk: int | None = None,
                   static_theta: bool = False, schedule: VPSchedule | None = None,
                   theta_prior: tuple[torch.Tensor, torch.Tensor] | None = None,
                   evidence_scale: float = 1.0) -> EpsFn:
    """``eps_fn`` over windows of ``W`` states turned into one over whole trajectories
    (:func:`composed_eps`), the form :func:`sample_posterior` takes (with ``static_theta``,
    sample with ``theta_frames=1``; with ``schedule`` too, θ by evidence composition, and with
    ``theta_prior`` as well, by the shared composition; ``evidence_scale`` tempers either)."""

    def eps(
        x_state: torch.Tensor, x_theta: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return composed_eps(eps_fn, x_state, x_theta, t, window, chunk=chunk,
                            static_theta=static_theta, schedule=schedule, theta_prior=theta_prior,
                            evidence_scale=evidence_scale)

    return eps


def composed_score(
    eps_fn: EpsFn,
    schedule: VPSchedule,
    x_state: torch.Tensor,
    x_theta: torch.Tensor,
    t: torch.Tensor | float,
    window: int,
    *,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score ``∇ log p_t(x_{1:L}) ≈ −ε/σ(t)`` of whole trajectories from :func:`composed_eps`.

    Shapes as in :func:`composed_eps`; returns ``(B, L, C, *spatial)`` and ``(B, L, P)``.
    """
    es, et = composed_eps(eps_fn, x_state, x_theta, t, window, chunk=chunk)
    tb = _batch_t(t, x_state.shape[0], x_state)
    _, sig_s = schedule.mu_sigma(tb, x_state)
    _, sig_t = schedule.mu_sigma_theta(tb, x_theta)
    return -es / sig_s, -et / sig_t


# ------------------------------------------------------------------------------------------------
# observations
def make_window_observe(
    normalizer: Normalizer,
    operator: Callable[[torch.Tensor], torch.Tensor],
    times: Sequence[int],
    state_shape: Sequence[int] | None = None,
) -> ObserveFn:
    """Observation function of a window for :func:`sample_posterior`.

    Decodes the normalised estimate to physical units, takes the states at ``times`` and
    applies ``operator`` (e.g. a :class:`kernels.observe.ObservationOperator`) to each.

    Args:
        normalizer: the denoiser's normaliser.
        operator: ``(N, *state_shape) -> (N, m)``, differentiable torch.
        times: indices into the window's time axis of the observed states.
        state_shape: shape the operator expects for one state; defaults to
            ``operator.state_shape``. A window state ``(C, *spatial)`` is reshaped to it (a
            one-channel ring ``(1, n)`` becomes ``(n,)``).

    Returns:
        ``observe(x̂0_state (B, L, C, *sp), x̂0_theta (B, L, P)) -> (B, len(times)·m)``,
        time-major (all observations of ``times[0]`` first), the layout ``y`` must follow.
    """
    shape = tuple(state_shape if state_shape is not None else operator.state_shape)  # type: ignore[attr-defined]
    index = torch.as_tensor(list(times), dtype=torch.long)
    if index.dim() != 1 or index.numel() == 0:
        raise ValueError(f"times must be a non-empty sequence of indices, got {times!r}")

    def observe(x_state: torch.Tensor, x_theta: torch.Tensor) -> torch.Tensor:
        phys, _ = normalizer.decode(x_state, x_theta)
        sel = phys.index_select(1, index.to(phys.device))  # (B, T, C, *sp)
        hx = operator(sel.reshape(-1, *shape))  # (B·T, m)
        return hx.reshape(x_state.shape[0], -1)

    return observe


def mean_projection(normalizer: Normalizer, channels: Sequence[int]) -> StateProjection | None:
    """Projection of normalised states onto zero *physical* spatial mean in ``channels``.

    A field whose spatial mean is zero in every training state (``Dynamics.mean_free``, e.g.
    vorticity on a periodic domain) has a data distribution of zero width along that direction:
    its exact denoiser returns the mean exactly, so ``ε`` along it is ``(x̄_t − μ_t c)/σ_t``. A
    trained network only approximates that, and no observation that misses the mean (pooled
    velocity: ``Δ⁻¹`` drops ``k = 0``) corrects the error, which the sampler then integrates
    (measured on the 64² Kolmogorov model: spatial means of −85 to +30 where the field's std is
    4.4). Projecting ``x̂_0`` restores the exact value along that one direction per frame and
    channel and leaves every other direction alone.

    Args:
        normalizer: the model's normaliser (a channel's zero maps to ``−mean/std``).
        channels: channel indices ``c`` of ``(B, L, C, *sp)`` to pin; may be empty.

    Returns:
        ``x̂0 (B, L, C, *sp) -> (B, L, C, *sp)``; None when there is nothing to pin (no channel
        or no spatial axis), so that the sampler keeps its ε untouched rather than rounding it
        through an identity.
    """
    idx = sorted({int(c) for c in channels})
    nch = normalizer.state_mean.numel()
    if any(c < 0 or c >= nch for c in idx):
        raise ValueError(f"channels {idx} out of range for {nch} state channel(s)")
    axes = tuple(range(-normalizer.spatial_ndim, 0))
    if not idx or not axes:
        return None

    def project(x0: torch.Tensor) -> torch.Tensor:
        target = (-normalizer.state_mean / normalizer.state_std).to(x0)  # physical 0, (C,)
        shift = x0.mean(dim=axes, keepdim=True) - target.reshape(-1, *([1] * len(axes)))
        keep = torch.zeros(nch, dtype=x0.dtype, device=x0.device)
        keep[idx] = 1.0
        return x0 - shift * keep.reshape(-1, *([1] * len(axes)))

    return project


class FrameCovariance:
    """Likelihood covariance ``Σ_f = diag(σ_f²) + c K`` of each observed frame ``f``, for any
    ``c = γ (σ_t/μ_t)² ≥ 0``, eigen-decomposed once.

    ``K (m_f, m_f)`` is ``H V Hᵀ`` of one frame (``ObservationOperator.white_covariance``): the
    SDA approximation ``Cov[x_0 | x_t] ≈ γ (σ_t/μ_t)² I`` (normalised state) carried to the
    observations *with its correlations*. Its diagonal alone is right for point observations;
    for an operator whose rows overlap (a pooled velocity) a large-scale pattern has a variance
    up to 12× the diagonal's (64², factor 8), and a diagonal Σ lets the guidance overshoot
    along it (measured: the 64² velocity case non-finite by ``t = 0.7``). With
    ``M_f = S_f^{-1/2} K S_f^{-1/2} = U Λ Uᵀ`` (``S_f = diag σ_f²``) the quadratic form is
    ``Σ_j (Uᵀ S_f^{-1/2} r)_j² / (1 + c λ_j)``.

    Args:
        k_frame: ``K (m_f, m_f)``, symmetric positive semi-definite.
        sigma_y: observation noise std, a float or ``(T·m_f,)`` (frame-major).
        frames: ``T`` observed frames.
    """

    def __init__(self, k_frame: torch.Tensor, sigma_y: float | torch.Tensor, frames: int) -> None:
        k = torch.as_tensor(k_frame, dtype=torch.float64).cpu()
        if k.dim() != 2 or k.shape[0] != k.shape[1] or frames < 1:
            raise ValueError(f"k_frame must be square (m_f, m_f) and frames >= 1, got "
                             f"{tuple(k.shape)} and {frames}")
        mf = k.shape[0]
        sig = torch.as_tensor(sigma_y, dtype=torch.float64).cpu().reshape(-1)
        if sig.numel() == 1:
            sig = sig.expand(frames * mf)
        if sig.numel() != frames * mf or not bool((sig > 0).all()):
            raise ValueError(f"sigma_y must be > 0 and a float or ({frames * mf},), got {tuple(sig.shape)}")
        sig = sig.reshape(frames, mf)
        # frames with the same σ share one decomposition (the usual case: all of them)
        uniq, inv = torch.unique(sig, dim=0, return_inverse=True)
        lam, vec = [], []
        for row in uniq:
            w = 1.0 / row
            ev, u = torch.linalg.eigh(0.5 * (k + k.T) * w[:, None] * w[None, :])
            lam.append(ev.clamp_min(0.0))
            vec.append(u)
        self.m_frame, self.frames = mf, frames
        self.inv_sigma = 1.0 / sig                      # (T, m_f)
        self.lam = torch.stack(lam)[inv]                # (T, m_f)
        self.basis = torch.stack(vec)[inv]              # (T, m_f, m_f)
        self._on: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, ...]] = {}

    def _like(self, r: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = (r.dtype, r.device)
        if key not in self._on:  # one copy per dtype and device, not one per call
            self._on[key] = tuple(v.to(r) for v in (self.inv_sigma, self.basis, self.lam))
        return self._on[key]

    def matvec(self, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``Σ v`` per sample: ``v (B, T·m_f)``, ``c (B, 1)`` -> ``(B, T·m_f)``;
        ``Σ_f = S_f^{1/2} (I + c M_f) S_f^{1/2}``."""
        inv_sigma, basis, lam = self._like(v)
        b = v.shape[0]
        z = torch.einsum("tij,bti->btj", basis, v.reshape(b, self.frames, self.m_frame) / inv_sigma)
        z = z * (1 + c.reshape(b, 1, 1) * lam)
        return (torch.einsum("tij,btj->bti", basis, z) / inv_sigma).reshape(b, -1)

    def quad(self, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``rᵀ Σ⁻¹ r`` per sample: ``r (B, T·m_f)``, ``c (B, 1)`` -> ``(B,)``, dtype of ``r``."""
        inv_sigma, basis, lam = self._like(r)
        b = r.shape[0]
        rw = r.reshape(b, self.frames, self.m_frame) * inv_sigma
        z = torch.einsum("tij,bti->btj", basis, rw)
        return (z.square() / (1 + c.reshape(b, 1, 1) * lam)).sum(dim=(1, 2))


def likelihood_scale(
    op: Any, state_var: torch.Tensor, sigma_y: float | torch.Tensor, frames: int,
    dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
) -> torch.Tensor | FrameCovariance:
    """The ``gamma_scale`` of :func:`posterior_eps` for ``frames`` frames observed through ``op``.

    Args:
        op: an ``ObservationOperator`` (kernels.observe) in physical units.
        state_var: physical variance of one normalised unit per channel, ``(C,)``
            (``Normaliser.state_std²``).
        sigma_y: observation noise std, a float or ``(frames · m,)``.
        frames: observed frames ``T``.
        dtype, device: of the per-observation scales (a :class:`FrameCovariance` follows the
            residuals it is applied to).

    Returns:
        ``(T·m,)`` per-observation scales when no two observations share a state component
        (points, blocks: exact, the covariance is diagonal); otherwise a
        :class:`FrameCovariance` with the full ``H V Hᵀ``.
    """
    if op.disjoint_rows:
        return op.white_variance(state_var).repeat(frames).to(dtype=dtype, device=device)
    return FrameCovariance(op.white_covariance(state_var), sigma_y, frames)


def _obs_variance(
    sigma_y: float | torch.Tensor, gamma: float, gamma_scale: float | torch.Tensor | None,
    ratio2: torch.Tensor, like: torch.Tensor,
) -> torch.Tensor:
    """``σ_y² + γ·scale·(σ_t/μ_t)²`` broadcast against ``like (B, m)``; ``ratio2 (B, 1)``."""
    sy = torch.as_tensor(sigma_y, dtype=like.dtype, device=like.device)
    scale = 1.0 if gamma_scale is None else torch.as_tensor(gamma_scale, dtype=like.dtype, device=like.device)
    for name, v in (("sigma_y", sy), ("gamma_scale", torch.as_tensor(scale))):
        if v.dim() > 1 or (v.dim() == 1 and v.shape[0] not in (1, like.shape[-1])):
            raise ValueError(f"{name} must be a scalar or ({like.shape[-1]},), got {tuple(v.shape)}")
    return sy * sy + gamma * scale * ratio2


def _tweedie_solve(
    pred: torch.Tensor,
    x_t: tuple[torch.Tensor, torch.Tensor],
    x0: tuple[torch.Tensor, torch.Tensor],
    cov_scale: tuple[torch.Tensor, torch.Tensor],
    observe: ObserveFn,
    y: torch.Tensor,
    base: Callable[[torch.Tensor], torch.Tensor],
    steps: int,
) -> torch.Tensor:
    """``u ≈ Σ⁻¹ (y − pred)`` per sample, ``Σ = Σ_0 + H C Hᵀ``, by ``steps`` CG steps from 0.

    ``C v = s ⊙ (∂x̂_0/∂x_t)ᵀ v`` per group (``s = σ²/μ`` of the state and of θ, whose clock may
    lag): one vector–Jacobian product of ``pred`` through the denoiser's retained graph. ``H``
    applied to it is a Jacobian–vector product of ``observe`` at ``x̂_0`` (detached: its own
    small graph, by the double-backward identity ``H g = ∂(Hᵀw · g)/∂w``).

    Args:
        pred: ``observe(x̂_0(x_t))`` ``(B, m)``, with its graph to ``x_t``.
        x_t: the leaves ``(x_state, x_theta)`` ``pred`` was computed from.
        x0: ``(x̂_0 state, x̂_0 θ)`` (their values; detached here).
        cov_scale: ``σ²/μ`` of each group, broadcastable against it.
        observe, y: as in :func:`posterior_eps`; ``y`` ``(m,)`` or ``(B, m)``.
        base: ``v (B, m) ↦ Σ_0 v``, the rest of the covariance (σ_y² and SDA's γ term).
        steps: CG steps (≥ 1).

    Returns:
        ``(B, m)``, detached. A sample whose curvature ``pᵀΣp`` comes out ≤ 0 (a learnt
        Jacobian need not be positive semi-definite) keeps its last iterate.
    """
    r = (y - pred).detach()
    leaves = tuple(v.detach().requires_grad_(True) for v in x0)
    w = torch.zeros_like(r, requires_grad=True)
    with torch.enable_grad():
        ht_w = torch.autograd.grad(observe(*leaves), leaves, grad_outputs=w, create_graph=True,
                                   allow_unused=True)  # Hᵀw, linear in w
    # groups the observations depend on (θ's usually not: H_θ = 0 drops its block)
    pairs = [(h, s, x) for h, s, x in zip(ht_w, cov_scale, x_t, strict=True) if h is not None]

    def matvec(v: torch.Tensor) -> torch.Tensor:
        if not pairs:
            return base(v)
        jt = torch.autograd.grad(pred, [x for _, _, x in pairs], grad_outputs=v, retain_graph=True,
                                 allow_unused=True)
        cv = [s * g if g is not None else torch.zeros_like(x) for (_, s, x), g in zip(pairs, jt, strict=True)]
        hcv = torch.autograd.grad([h for h, _, _ in pairs], w, grad_outputs=cv, retain_graph=True)[0]
        return base(v) + hcv

    u = torch.zeros_like(r)
    res, p = r.clone(), r.clone()
    rs = res.square().sum(1, keepdim=True)
    live, one = torch.ones_like(rs, dtype=torch.bool), torch.ones_like(rs)
    for _ in range(steps):
        ap = matvec(p)
        pap = (p * ap).sum(1, keepdim=True)
        live = live & (pap > 0) & (rs > 0)  # a finished or indefinite row stops where it is
        alpha = torch.where(live, rs / torch.where(live, pap, one), 0.0)
        u = u + alpha * p
        res = res - alpha * ap
        rs_new = res.square().sum(1, keepdim=True)
        p = res + torch.where(live, rs_new / torch.where(live, rs, one), 0.0) * p
        rs = rs_new
    return u.detach()


def posterior_eps(
    eps_fn: EpsFn,
    schedule: VPSchedule,
    x_state: torch.Tensor,
    x_theta: torch.Tensor,
    t: torch.Tensor | float,
    observe: ObserveFn,
    y: torch.Tensor,
    sigma_y: float | torch.Tensor,
    gamma: float,
    *,
    gamma_scale: float | torch.Tensor | FrameCovariance | None = None,
    theta_guidance: bool = True,
    cg_steps: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior noise ``ε̂ − σ_t ∇_{x_t} log N(y | observe(x̂_0), Σ_t)``.

    ``Σ_t`` is SDA's ``σ_y² + γ (σ_t/μ_t)²`` (``cg_steps = 0``); with ``cg_steps ≥ 1`` Tweedie's
    covariance ``H Cov[x_0 | x_t] Hᵀ``, ``Cov[x_0 | x_t] = (σ_t²/μ_t) ∂x̂_0/∂x_t``, is added to it
    (with ``γ = 0`` this is the moment-matched likelihood of Rozet et al., 2024, "MMPS": exact for
    a Gaussian prior, and the spread of components far from any observation follows what the
    denoiser is unsure of instead of one scalar for all). ``Σ_t⁻¹ r`` is solved by ``cg_steps``
    conjugate-gradient steps per sample, each one vector–Jacobian product through the denoiser
    (its Jacobian taken as symmetric, which the exact one is); ``H`` is ``observe``'s Jacobian at
    ``x̂_0``; ``Σ_t`` is held fixed in the gradient, as in MMPS. Why keep ``γ``: through a
    *trained* network Tweedie's covariance at high noise is the small difference of two large
    terms, ``(σ_t/μ_t)² (I − σ_t ∂ε̂/∂x_t)``, and its errors let the guidance overshoot (measured:
    Lorenz-96 and Kolmogorov samples run off with ``γ = 0``); ``γ``'s term, large there, holds it.

    The gradient goes by autograd through ``eps_fn`` (``x̂_0 = (x_t − σ_t ε̂)/μ_t``), as in SDA;
    it is taken of the sum of the samples' log-likelihoods, which is each sample's own gradient
    when ``eps_fn`` and ``observe`` act on samples independently.

    Args:
        eps_fn: trajectory noise predictor (:func:`trajectory_eps`), normalised space.
        schedule: the noise schedule.
        x_state: ``(B, L, C, *spatial)``.
        x_theta: ``(B, L, P)``.
        t: diffusion time, scalar or ``(B,)``.
        observe: ``(x̂0_state, x̂0_theta) -> (B, m)`` predicted observations.
        y: observations ``(m,)`` (shared) or ``(B, m)``.
        sigma_y: observation noise std, float or ``(m,)``.
        gamma: ``γ`` of the likelihood variance.
        gamma_scale: optional ``(m,)`` (or float) factor on ``γ`` per observation, e.g. the
            squared physical std of the observed channel when ``observe`` returns physical
            units (``(σ_t/μ_t)²`` is a variance in normalised units); or a
            :class:`FrameCovariance`, which then carries ``σ_y`` too (``sigma_y`` unused).
        theta_guidance: whether the likelihood gradient also reaches θ (through the
            denoiser); False leaves θ's ε the prior's (:class:`SDASettings`).
        cg_steps: 0 for SDA's ``γ`` variance; ``k ≥ 1`` adds Tweedie's covariance, solved by
            ``k`` CG steps.

    Returns:
        ``ε_post`` for the state ``(B, L, C, *spatial)`` and θ ``(B, L, P)``, detached.
    """
    b = x_state.shape[0]
    tb = _batch_t(t, b, x_state)
    mu_s, sig_s = schedule.mu_sigma(tb, x_state)
    mu_t, sig_t = schedule.mu_sigma_theta(tb, x_theta)
    with torch.enable_grad():
        xs = x_state.detach().requires_grad_(True)
        xt = x_theta.detach().requires_grad_(True)
        es, et = eps_fn(xs, xt, tb)
        x0 = ((xs - sig_s * es) / mu_s, (xt - sig_t * et) / mu_t)
        pred = observe(*x0)
        if pred.dim() != 2 or pred.shape[0] != b:
            raise ValueError(f"observe must return (B, m) = ({b}, m), got {tuple(pred.shape)}")
        if not (y.shape == pred.shape or y.shape == pred.shape[1:]):
            raise ValueError(f"y has shape {tuple(y.shape)}; expected ({pred.shape[1]},) or "
                             f"{tuple(pred.shape)}")
        mu_y, sig_y = schedule.mu_sigma(tb, pred)
        ratio2 = (sig_y / mu_y) ** 2 * torch.ones(b, 1, dtype=pred.dtype, device=pred.device)
        fc = gamma_scale if isinstance(gamma_scale, FrameCovariance) else None
        if fc is not None and pred.shape[1] != fc.frames * fc.m_frame:
            raise ValueError(f"observe gives {pred.shape[1]} observations; the covariance "
                             f"is for {fc.frames} × {fc.m_frame}")
        var = None if fc is not None else _obs_variance(sigma_y, gamma, gamma_scale, ratio2, pred)
        if cg_steps > 0:
            def base(v: torch.Tensor) -> torch.Tensor:  # σ_y² + SDA's γ term (γ = 0: MMPS's)
                return fc.matvec(v, gamma * ratio2) if fc is not None else var * v

            u = _tweedie_solve(pred, (xs, xt), x0, (sig_s**2 / mu_s, sig_t**2 / mu_t), observe,
                               y.to(pred), base, cg_steps)
            target, outputs = pred, u  # ∇ log N with Σ held fixed: (∂pred/∂x)ᵀ Σ⁻¹ r
        else:
            if fc is not None:
                log_p = -0.5 * fc.quad(y.to(pred) - pred, gamma * ratio2).sum()
            else:
                log_p = -0.5 * ((y.to(pred) - pred).square() / var).sum()
            target, outputs = log_p, None
        if theta_guidance:
            gs, gt = torch.autograd.grad(target, (xs, xt), grad_outputs=outputs, allow_unused=True)
        else:
            (gs,), gt = torch.autograd.grad(target, (xs,), grad_outputs=outputs, allow_unused=True), None
    gs = torch.zeros_like(xs) if gs is None else gs
    gt = torch.zeros_like(xt) if gt is None else gt
    return (es - sig_s * gs).detach(), (et - sig_t * gt).detach()


# ------------------------------------------------------------------------------------------------
# sampler
@dataclass(frozen=True)
class SDASettings:
    """Settings of the predictor–corrector posterior sampler.

    Attributes:
        steps: predictor steps from ``t = 1`` to ``t = 0`` (uniform grid).
        corrector: Langevin corrector steps ``C`` after each predictor step (0: none).
        tau: corrector step factor ``τ > 0``: Langevin step ``τ / mean(‖∇log p‖²)`` per sample
            (θ on a lagging clock, ``VPSchedule.theta_lag > 1``: ``τ σ_θ²``).
        gamma: ``γ ≥ 0`` in the likelihood variance ``σ_y² + γ (σ_t/μ_t)²``.
        ddim_eta: stochasticity of the predictor in ``[0, 1]``: 0 = deterministic DDIM (SDA),
            1 = ancestral sampling.
        noise_block: elements of noise drawn per sample and request (several steps at once);
            the block length depends only on the size of one sample, never on the batch.
        theta_clip: bound ``c`` on the denoised θ estimate ``|x̂₀(θ)| ≤ c`` in normalised units
            (None: no bound). The likelihood gradient of many observations acts on a handful of
            θ values through a denoiser that never saw θ outside its training prior; left
            alone, a sample's θ now and then runs off to values the prior gives no mass
            (measured: F = −4000 for Lorenz-96, e^300 for Kolmogorov viscosity). The bound is
            applied as in clipped DDIM: ε̂(θ) is replaced by the noise consistent with the
            clamped x̂₀, in the predictor and the corrector alike.
        theta_guidance: whether the likelihood gradient moves θ too. y is independent of θ
            given the states: in the exact joint score θ_t reaches y only through what it says
            about x_0 beyond x_t, a small term (the analytic chain's posterior is the same
            without it). Through a *trained* denoiser and the Gaussian approximation that term
            sums thousands of observations onto a handful of θ values. With a learnt
            window network it over-concentrates θ (measured: Kolmogorov ν 90 % interval
            narrower with observations than from the true states, and not covering the truth;
            False: both parameters covered, docs/benchmarks.md). On the analytic chain the two
            agree (θ sd 0.565 either way, Kalman 0.512).
        likelihood_cg: 0 for SDA's likelihood variance ``σ_y² + γ (σ_t/μ_t)²``; ``k ≥ 1`` adds
            Tweedie's covariance through the denoiser, ``H (σ_t²/μ_t) ∂x̂_0/∂x_t Hᵀ``, solved by
            ``k`` conjugate-gradient steps (:func:`posterior_eps`; each costs one more backward
            pass through the network; ``γ = 0`` then gives MMPS).
    """

    steps: int = 256
    corrector: int = 1
    tau: float = 0.5
    gamma: float = 1e-2
    ddim_eta: float = 0.0
    noise_block: int = 1 << 20
    theta_clip: float | None = None
    theta_guidance: bool = True
    likelihood_cg: int = 0

    def __post_init__(self) -> None:
        def _int(name: str, low: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")

        def _real(name: str, ok: Callable[[float], bool], what: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise ValueError(f"{name} must be {what}, got {v!r}")

        _int("steps", 1)
        _int("corrector", 0)
        _real("tau", lambda v: v > 0, "a finite number > 0")
        _real("gamma", lambda v: v >= 0, "a finite number >= 0")
        _real("ddim_eta", lambda v: 0 <= v <= 1, "a number in [0, 1]")
        _int("noise_block", 1)
        _int("likelihood_cg", 0)
        if self.theta_clip is not None:
            _real("theta_clip", lambda v: v > 0, "None or a finite number > 0")


def _mu_sigma(schedule: VPSchedule, t: float, theta: bool = False) -> tuple[float, float]:
    """``(μ_t, σ_t)`` as floats (θ's with ``theta``), the schedule evaluated in float64 whatever
    the working dtype."""
    tt = torch.tensor(t, dtype=torch.float64)
    if theta:
        tt = schedule.theta_time(tt)
    return float(schedule.mu(tt)), float(schedule.sigma(tt))


class _NoiseStream:
    """Per-sample standard normals ``(B, d)``, one vector per :meth:`draw`, from one generator per
    sample, requested in blocks of ``k`` vectors where ``k`` depends only on ``d``: how
    ``torch.randn`` consumes a generator depends on the request size, so the requests must not
    depend on the batch."""

    def __init__(self, generators: Sequence[torch.Generator], d: int, total: int, block_elems: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.generators, self.d, self.left = generators, d, total
        self.k = max(1, min(total, block_elems // max(d, 1)))
        self.dtype, self.device = dtype, device
        self.buf = torch.empty(len(generators), 0, d, dtype=dtype)
        self.pos = 0

    def draw(self) -> torch.Tensor:
        if self.pos == self.buf.shape[1]:
            kb = min(self.k, self.left)
            if kb < 1:
                raise RuntimeError("noise stream exhausted")
            gdev = self.generators[0].device
            buf = torch.empty(len(self.generators), kb, self.d, dtype=self.dtype, device=gdev)
            for i, g in enumerate(self.generators):
                torch.randn(kb, self.d, generator=g, dtype=self.dtype, device=gdev, out=buf[i])
            self.buf, self.pos, self.left = buf.to(self.device), 0, self.left - kb
        self.pos += 1
        return self.buf[:, self.pos - 1]


def sample_posterior(
    eps_fn: EpsFn,
    schedule: VPSchedule,
    state_shape: Sequence[int],
    n_params: int,
    generators: Sequence[torch.Generator],
    settings: SDASettings | None = None,
    *,
    observe: ObserveFn | None = None,
    y: torch.Tensor | None = None,
    sigma_y: float | torch.Tensor = 1.0,
    gamma_scale: float | torch.Tensor | FrameCovariance | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    theta_frames: int | None = None,
    project_state: StateProjection | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample trajectories ``x_{1:L}`` (and θ) from the SDA posterior, in normalised space.

    Predictor–corrector scheme of the module docstring; one sample per generator, all in one
    batch. Without ``observe`` it samples the prior.

    Args:
        eps_fn: trajectory noise predictor ``(B, L, C, *sp), (B, L, P), (B,) -> ε``, e.g.
            ``trajectory_eps(denoiser.eps, W)``; must act on samples independently.
        schedule: the noise schedule the predictor was trained with.
        state_shape: ``(L, C, *spatial)`` of one trajectory.
        n_params: ``P``.
        generators: one ``torch.Generator`` per sample, all on one device; ``B = len(generators)``.
        settings: :class:`SDASettings` (defaults when None).
        observe: ``(x̂0_state (B, L, C, *sp), x̂0_theta (B, L, P)) -> (B, m)``, taking normalised
            estimates (decode inside, e.g. :func:`make_window_observe`); None: prior sampling.
        y: observations ``(m,)`` or ``(B, m)``; needed with ``observe``.
        sigma_y: observation noise std, float or ``(m,)``, in the units of ``observe``'s output.
        gamma_scale: optional per-observation factor on ``γ`` (:func:`posterior_eps`).
        dtype: working dtype.
        device: working device (default: the generators' device).
        theta_frames: frames of θ, ``L`` (default: one θ per frame) or ``1`` (one static θ
            per trajectory, with ``trajectory_eps(..., static_theta=True)``).
        project_state: optional projection of the state's ``x̂_0`` onto the states the data can
            take (:func:`mean_projection`); the state's ``ε`` is replaced by the noise consistent
            with the projected ``x̂_0`` in the predictor and the corrector, after the likelihood.

    Returns:
        ``x_state (B, L, C, *spatial)`` and ``x_theta (B, theta_frames, P)`` at ``t = 0``,
        normalised.
    """
    s = SDASettings() if settings is None else settings
    if len(generators) < 1:
        raise ValueError("need at least one generator (one per sample)")
    if len({g.device for g in generators}) > 1:
        raise ValueError("all generators must live on the same device")
    if observe is not None and y is None:
        raise ValueError("observe was given without observations y")
    state_shape = tuple(int(v) for v in state_shape)
    if len(state_shape) < 2 or min(state_shape) < 1 or n_params < 0:
        raise ValueError(f"bad shapes: state_shape={state_shape} (need (L, C, *spatial)), "
                         f"n_params={n_params}")
    dev = torch.device(device) if device is not None else generators[0].device
    b, length = len(generators), state_shape[0]
    d_state = math.prod(state_shape)
    t_frames = length if theta_frames is None else int(theta_frames)
    if t_frames not in (1, length):
        raise ValueError(f"theta_frames must be 1 or L = {length}, got {theta_frames!r}")
    d = d_state + t_frames * n_params

    def split(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return z[:, :d_state].reshape(b, *state_shape), z[:, d_state:].reshape(b, t_frames, n_params)

    def eps_at(xs: torch.Tensor, xt: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        if observe is None:
            es, et = eps_fn(xs, xt, torch.full((b,), t, dtype=dtype, device=dev))
        else:
            es, et = posterior_eps(eps_fn, schedule, xs, xt, t, observe, y, sigma_y, s.gamma,
                                   gamma_scale=gamma_scale, theta_guidance=s.theta_guidance,
                                   cg_steps=s.likelihood_cg)
        if project_state is not None:
            mu, sig = ms(t)  # σ ≥ the schedule's η > 0
            es = (xs - mu * project_state((xs - sig * es) / mu)) / sig
        if s.theta_clip is not None and et.numel():
            mu, sig = ms(t, theta=True)
            if sig > 0:  # ε consistent with the clamped x̂₀: (x_t − μ clamp(x̂₀)) / σ
                x0 = (xt - sig * et) / mu
                et = et + (x0 - x0.clamp(-s.theta_clip, s.theta_clip)) * (mu / sig)
        return es, et

    def ms(t: float, theta: bool = False) -> tuple[float, float]:
        return _mu_sigma(schedule, t, theta)

    def step_coefficients(t: float, t_next: float, theta: bool) -> tuple[float, float, float, float]:
        """Exponential-integrator (DDIM) step of one group: ``x ← r x + a ε + c z``; and σ at
        ``t_next`` for the corrector. θ on a lagging clock has its own μ, σ."""
        (mu_t, sig_t), (mu_n, sig_n) = ms(t, theta), ms(t_next, theta)
        r = mu_n / mu_t
        c = 0.0
        if stochastic:
            cond2 = max(sig_t**2 - (mu_t / mu_n) ** 2 * sig_n**2, 0.0)  # Var[x_t | x_s]
            c = s.ddim_eta * sig_n * math.sqrt(cond2) / sig_t
        return r, math.sqrt(max(sig_n**2 - c * c, 0.0)) - r * sig_t, c, sig_n

    stochastic = s.ddim_eta > 0
    lagged = schedule.theta_lag != 1.0
    noise = _NoiseStream(generators, d, 1 + s.steps * (s.corrector + stochastic), s.noise_block, dtype, dev)
    xs, xt = split(noise.draw())
    tiny = torch.finfo(dtype).tiny
    with torch.no_grad():
        for j in range(s.steps):
            t, t_next = 1.0 - j / s.steps, 1.0 - (j + 1) / s.steps
            r, a, c, sig_n = step_coefficients(t, t_next, False)
            r_t, a_t, c_t, sig_nt = step_coefficients(t, t_next, True)
            es, et = eps_at(xs, xt, t)
            xs, xt = r * xs + a * es, r_t * xt + a_t * et
            if stochastic:
                zs, zt = split(noise.draw())
                xs, xt = xs + c * zs, xt + c_t * zt
            for _ in range(s.corrector):
                es, et = eps_at(xs, xt, t_next)
                msq = (es.reshape(b, -1).square().sum(1) + et.reshape(b, -1).square().sum(1)) / d
                delta = s.tau / msq.clamp_min(tiny)  # (B,): each sample its own step
                # θ on its own clock: the states' step (scaled by their ε, which shrinks as they
                # clear) can be many times θ's local variance, and θ's own ε² (P numbers) is too
                # noisy to scale by. A step of τ σ_θ² is at most τ times the variance of
                # p(θ_t | x_t) ≥ σ_θ²: stable whatever the states say about θ.
                delta_t = torch.full_like(delta, s.tau) if lagged else delta
                zs, zt = split(noise.draw())
                ds = delta.reshape(b, *([1] * (xs.dim() - 1)))
                dt_ = delta_t.reshape(b, 1, 1)
                # Langevin on −ε/σ per group, preconditioned by each group's σ² (the same target)
                xs = xs - sig_n * (ds * es + torch.sqrt(2 * ds) * zs)
                xt = xt - sig_nt * (dt_ * et + torch.sqrt(2 * dt_) * zt)
    return xs, xt


def sample_theta_given_states(
    eps_fn: EpsFn,
    schedule: VPSchedule,
    x_state: torch.Tensor,
    n_params: int,
    generators: Sequence[torch.Generator],
    steps: int = 64,
    *,
    theta_frames: int | None = None,
    theta_clip: float | None = None,
) -> torch.Tensor:
    """θ alone from what the network reads in *known* states: ``θ ~ p(θ | x_{1:L})``.

    A diagnostic of the window network's own evidence on θ (no observations, no likelihood):
    ancestral (DDPM) steps on θ from ``t = 1`` to 0, the states replaced at every step by the
    given clean window noised to that step's level, ``μ_t x + σ_t z``, with fresh ``z``.

    Args:
        eps_fn: trajectory noise predictor (:func:`trajectory_eps`), normalised space.
        schedule: the noise schedule.
        x_state: the clean window, normalised, ``(L, C, *spatial)``.
        n_params: ``P ≥ 1``.
        generators: one per sample (streams as in :func:`sample_posterior`).
        steps: ancestral steps.
        theta_frames: ``1`` (static θ, with ``trajectory_eps(..., static_theta=True)``) or
            ``L`` (default).
        theta_clip: bound on the denoised θ (:class:`SDASettings`), None for none.

    Returns:
        ``x_theta (B, theta_frames, P)`` at ``t = 0``, normalised.
    """
    if n_params < 1 or steps < 1 or len(generators) < 1:
        raise ValueError(f"need n_params >= 1, steps >= 1 and a generator, got {n_params}, "
                         f"{steps}, {len(generators)}")
    b, length = len(generators), x_state.shape[0]
    t_frames = length if theta_frames is None else int(theta_frames)
    if t_frames not in (1, length):
        raise ValueError(f"theta_frames must be 1 or L = {length}, got {theta_frames!r}")
    d_state = x_state.numel()
    d = d_state + t_frames * n_params
    noise = _NoiseStream(generators, d, steps + 1, 1 << 20, x_state.dtype, x_state.device)

    xt = noise.draw()[:, d_state:].reshape(b, t_frames, n_params)
    with torch.no_grad():
        for j in range(steps):
            t, t_next = 1.0 - j / steps, 1.0 - (j + 1) / steps
            mu_x, sig_x = _mu_sigma(schedule, t)
            (mu, sig), (mu_n, sig_n) = _mu_sigma(schedule, t, True), _mu_sigma(schedule, t_next, True)
            z = noise.draw()
            xs = mu_x * x_state.unsqueeze(0) + sig_x * z[:, :d_state].reshape(b, *x_state.shape)
            _, et = eps_fn(xs, xt, torch.full((b,), t, dtype=x_state.dtype, device=x_state.device))
            x0 = (xt - sig * et) / mu
            if theta_clip is not None:
                x0 = x0.clamp(-theta_clip, theta_clip)
            # q(θ_s | θ_t, θ̂_0) of the VP process
            var_ts = max(sig**2 - (mu / mu_n) ** 2 * sig_n**2, 0.0)
            mean = (mu_n * var_ts / sig**2) * x0 + ((mu / mu_n) * sig_n**2 / sig**2) * xt
            std = math.sqrt(var_ts) * sig_n / sig
            xt = mean + std * z[:, d_state:].reshape(b, t_frames, n_params)
    return xt
