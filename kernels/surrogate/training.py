"""Training helpers for surrogates: (history, target) pairs, losses, keyed target noise, a fit loop.

Pairs are cut from trajectories with ``Tensor.unfold`` (no loop over time): a trajectory of
``T`` frames gives ``T − H − K + 1`` windows of ``H`` inputs and ``K`` targets. Losses are mean
squares of errors in units of the network's ``step_scale`` (a typical one-step change), so a
loss of 1 is as bad as predicting persistence on average and the number means the same for
every model.

Data-assimilation-in-training: :func:`analysis_pairs` turns an EnSF/EnKF-corrected roll-out
over a training period (:func:`kernels.surrogate.rollout.filtered_rollout`) into new pairs whose
targets are analyses; the pipeline fine-tunes on them (with :func:`fit`) and repeats.
"""

from __future__ import annotations

import math

import torch

from kernels.streams import Key, generator
from kernels.surrogate.nets import Surrogate
from kernels.surrogate.rollout import rollout

__all__ = [
    "add_trajectory_noise",
    "analysis_pairs",
    "fit",
    "make_pairs",
    "one_step_loss",
    "one_step_rmse",
    "unrolled_loss",
]


def _batched(traj: torch.Tensor, state_ndim: int) -> torch.Tensor:
    """``(T, *state)`` or ``(N, T, *state)`` -> ``(N, T, *state)``."""
    if traj.ndim == state_ndim + 1:
        return traj.unsqueeze(0)
    if traj.ndim != state_ndim + 2:
        raise ValueError(f"trajectories must be (T, *state) or (N, T, *state) with {state_ndim} state "
                         f"axes, got {tuple(traj.shape)}")
    return traj


def make_pairs(
    trajectories: torch.Tensor,
    history: int,
    horizon: int = 1,
    *,
    state_ndim: int = 1,
    stride: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All (history, target) windows of a set of trajectories.

    Args:
        trajectories: ``(T, *state)`` or ``(N, T, *state)``.
        history: input frames ``H``.
        horizon: target frames ``K`` after each window (``K > 1`` for unrolled losses).
        state_ndim: number of state axes (1 for ``(n,)``, 2 for ``(C, n)``).
        stride: frames between the starts of consecutive windows.

    Returns:
        ``hist (M, H, *state)`` and ``targets (M, K, *state)``, trajectory-major (all windows of
        trajectory 0, then 1, ...), ``M = N · ⌊(T − H − K)/stride + 1⌋``; copies, not views.
    """
    if history < 1 or horizon < 1 or stride < 1:
        raise ValueError(f"history, horizon and stride must be >= 1, got {history}, {horizon}, {stride}")
    traj = _batched(trajectories, state_ndim)
    n, t = traj.shape[:2]
    length = history + horizon
    if t < length:
        raise ValueError(f"trajectories of {t} frames are too short for {history} + {horizon} frames")
    # (N, T, *S) -> (N, M, *S, H+K) -> (N, M, H+K, *S)
    windows = traj.unfold(1, length, stride).movedim(-1, 2)
    windows = windows.reshape(-1, length, *traj.shape[2:])
    return windows[:, :history].clone(), windows[:, history:].clone()


def analysis_pairs(
    initial: torch.Tensor,
    states: torch.Tensor,
    keep: torch.Tensor,
    *,
    state_ndim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training pairs from a corrected roll-out whose targets are analyses.

    The window before frame ``j`` of ``states`` is the last ``H`` frames of
    ``cat(initial, states)`` before it, so every input window is made of corrected states (the
    same windows the filtered roll-out fed the surrogate). Only pairs whose target is flagged in
    ``keep`` are returned: forecast-only frames are the surrogate's own output, and training on
    them would only teach it what it already predicts.

    Args:
        initial: the history before the first frame ``(H, *state)``.
        states: corrected trajectory ``(T, *state)`` (e.g. ``FilteredRollout.mean``).
        keep: ``(T,)`` bool, which frames are analyses (``FilteredRollout.assimilated``).
        state_ndim: number of state axes.

    Returns:
        ``hist (M, H, *state)`` and ``targets (M, *state)`` with ``M = keep.sum()``.
    """
    if initial.ndim != state_ndim + 1 or states.ndim != state_ndim + 1:
        raise ValueError(f"initial (H, *state) and states (T, *state) expected, got "
                         f"{tuple(initial.shape)} and {tuple(states.shape)}")
    if keep.shape != states.shape[:1]:
        raise ValueError(f"keep must be ({states.shape[0]},), got {tuple(keep.shape)}")
    hist, targets = make_pairs(torch.cat([initial, states.to(initial)]), initial.shape[0], 1,
                               state_ndim=state_ndim)
    sel = keep.to(device=hist.device, dtype=torch.bool)
    return hist[sel], targets[sel, 0]


def add_trajectory_noise(
    trajectories: torch.Tensor,
    std: float,
    seed: int,
    *keys: Key,
    state_ndim: int = 1,
) -> torch.Tensor:
    """``trajectories + std · ε`` with ε from the stream ``(seed, *keys, i)`` of trajectory ``i``.

    The 'noisy targets' regime: noisy trajectories give noisy inputs and targets alike, as
    noisy measurements of a system would. Noise is drawn in float64 on the CPU per trajectory,
    so it does not depend on the batch, the dtype or the device.

    Args:
        trajectories: ``(T, *state)`` (trajectory 0) or ``(N, T, *state)``.
        std: noise standard deviation (>= 0).
        seed, keys: the stream key.
        state_ndim: number of state axes.

    Returns:
        same shape, dtype and device.
    """
    if not (std >= 0 and math.isfinite(std)):
        raise ValueError(f"std must be finite and >= 0, got {std!r}")
    traj = _batched(trajectories, state_ndim)
    noise = torch.stack([torch.randn(tuple(traj.shape[1:]), generator=generator(seed, *keys, i),
                                     dtype=torch.float64) for i in range(traj.shape[0])])
    out = traj + (std * noise).to(dtype=traj.dtype, device=traj.device)
    return out.reshape(trajectories.shape)


def one_step_loss(net: Surrogate, hist: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared one-step error in units of ``step_scale``; a scalar.

    Args:
        net: the surrogate.
        hist: ``(M, H, *state)``.
        target: ``(M, *state)``, or ``(M, K, *state)`` (only the first frame is used).
    """
    if target.ndim == hist.ndim:
        target = target[:, 0]
    return net.normalized_error(net(hist), target).square().mean()


def unrolled_loss(net: Surrogate, hist: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error of a ``K``-step roll-out (the window shifted each step); a scalar.

    Training through the roll-out teaches the network to correct its own drift, which a
    one-step loss never shows it.

    Args:
        net: the surrogate.
        hist: ``(M, H, *state)``.
        targets: ``(M, K, *state)``.
    """
    pred = rollout(net, hist, targets.shape[1])
    return net.normalized_error(pred, targets).square().mean()


@torch.no_grad()
def one_step_rmse(net: Surrogate, hist: torch.Tensor, target: torch.Tensor,
                  batch_size: int = 4096) -> torch.Tensor:
    """Root-mean-square one-step error in state units, over all pairs and components; a scalar.

    Args:
        net: the surrogate.
        hist: ``(M, H, *state)``.
        target: ``(M, *state)``.
        batch_size: pairs per forward pass (bounds memory).
    """
    total = torch.zeros((), dtype=torch.float64, device=hist.device)
    for s in range(0, hist.shape[0], batch_size):
        total += (net(hist[s:s + batch_size]) - target[s:s + batch_size]).double().square().sum()
    return (total / target.numel()).sqrt()


def fit(
    net: Surrogate,
    hist: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int,
    generator: torch.Generator,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    unroll: int = 1,
    grad_clip: float | None = 1.0,
    warmup: int = 0,
) -> torch.Tensor:
    """Train ``net`` in place with AdamW and a cosine learning-rate decay.

    Minibatches are drawn with replacement from ``generator`` (a CPU generator), so the run is
    determined by its state. With ``unroll > 1`` the loss is :func:`unrolled_loss` over the first
    ``unroll`` target frames, otherwise :func:`one_step_loss`.

    Args:
        net: the surrogate (its normalisation should be set first).
        hist: ``(M, H, *state)``.
        targets: ``(M, *state)`` or ``(M, K, *state)`` with ``K >= unroll``.
        steps: optimiser steps.
        generator: CPU generator for the minibatch indices.
        batch_size: pairs per step.
        lr: peak learning rate.
        weight_decay: AdamW decoupled weight decay.
        unroll: roll-out length of the loss.
        grad_clip: global gradient-norm bound, or None.
        warmup: linear warm-up steps.

    Returns:
        the loss of every step ``(steps,)`` float64 on the CPU.
    """
    if steps < 1 or batch_size < 1 or unroll < 1:
        raise ValueError(f"steps, batch_size and unroll must be >= 1, got {steps}, {batch_size}, {unroll}")
    if targets.ndim == hist.ndim - 1:
        targets = targets.unsqueeze(1)
    if targets.shape[0] != hist.shape[0] or targets.shape[1] < unroll:
        raise ValueError(f"targets {tuple(targets.shape)} do not fit hist {tuple(hist.shape)} "
                         f"with unroll={unroll}")
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (k - warmup) / max(steps - warmup, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses = torch.empty(steps, dtype=torch.float64)
    net.train()
    for k in range(steps):
        idx = torch.randint(hist.shape[0], (batch_size,), generator=generator).to(hist.device)
        h, tgt = hist[idx], targets[idx, :unroll]
        loss = one_step_loss(net, h, tgt) if unroll == 1 else unrolled_loss(net, h, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        opt.step()
        sched.step()
        losses[k] = loss.detach()
    net.eval()
    return losses
