"""``scoreda simulate``: integrate an ensemble of one model and store it as a labelled dataset."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from kernels.streams import per_member
from pipeline.config import SimulateConfig, dump
from pipeline.datasets import trajectory_dataset
from pipeline.runtime import compute_device, progress
from pipeline.storage import check_output, write_dataset


class DivergenceError(RuntimeError):
    """A member's integration failed: non-finite, or past the model's growth bound."""


class RefinedStepper:
    """Advances a batch of trajectories, halving a trajectory's step where its integration fails.

    A trajectory that fails the model's check (``model.unstable``: non-finite, or past the
    model's growth bound) over one piece redoes that piece from its start with half the step,
    then keeps the smaller step for the rest of its run: the flows that need it are the
    energetic ones (low drag), and they stay so. Each trajectory's step depends on its own path
    only, so the numbers still do not depend on its batch; a trajectory that never fails is
    integrated exactly as with the fixed step.

    Attributes:
        level: ``(J,)`` int64, each trajectory's halvings so far (its step is ``dt / 2**level``).
    """

    def __init__(self, model: Any, dt: float, max_level: int, trajs: Sequence[int],
                 what: str = "trajectory") -> None:
        """``trajs`` name the batch's rows in messages (``what`` says what they are)."""
        self.model, self.trajs, self.what = model, list(trajs), what
        self.dt, self.max_level = float(dt), max_level
        self.level = torch.zeros(len(self.trajs), dtype=torch.int64)

    def __call__(self, x: torch.Tensor, theta: torch.Tensor, steps: int, where: str) -> torch.Tensor:
        """``x`` ``(J, *state)`` advanced by ``steps`` steps of ``dt`` under ``theta`` ``(J, P)``.

        Raises:
            DivergenceError: a trajectory still fails at ``dt / 2**max_refinements``.
        """
        y, level = self.model.advance_refined(x, theta, steps, self.dt, self.level, self.max_level)
        over = (level > self.max_level).nonzero().flatten()
        if over.numel():
            j = int(over[0])
            raise DivergenceError(
                f"{self.what} {self.trajs[j]} (θ = {theta[j].tolist()}) became non-finite or "
                f"unstable {where}, even at dt = {self.dt / (1 << self.max_level):g} "
                f"(max_refinements: {self.max_level}); lower model.dt or raise max_refinements")
        self.level = level
        return y

    def refined(self) -> dict[int, int]:
        """``{trajectory: halvings}`` of the trajectories whose step was halved."""
        return {self.trajs[j]: int(self.level[j]) for j in self.level.nonzero().flatten().tolist()}


def run_ensemble(
    cfg: SimulateConfig, desc: str = "simulate", refined: dict[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Integrate the ensemble that ``cfg`` describes.

    Member i's θ and initial state come from the streams ``(seed, "theta", i)`` and
    ``(seed, "init", i)``, so any member can be reproduced alone. A member whose integration
    fails over a saved interval redoes it at half the step and keeps that step
    (:class:`RefinedStepper`, up to ``cfg.max_refinements`` halvings).

    Args:
        cfg: the simulate config.
        desc: the progress bar's label.
        refined: filled with ``{member: halvings}`` of the members whose step was halved.

    Returns:
        trajectories ``(B, T, *state_shape)``, θ ``(B, P)`` and saved times ``(T,)``.

    Raises:
        DivergenceError: a member still fails at ``dt / 2**max_refinements``.
    """
    refined = {} if refined is None else refined
    model = cfg.model.build()
    dtype = getattr(torch, cfg.dtype)
    device = compute_device(cfg.device)
    dt = cfg.model.dt  # resolved to the model default by the config
    members = range(cfg.members)
    if cfg.theta == "prior":
        theta = per_member(lambda g: model.sample_prior(1, g, dtype=torch.float64)[0],
                           cfg.seed, members, "theta")
    else:
        theta = model.truth_theta(cfg.members, cfg.model.params, dtype=torch.float64)
    x0 = per_member(lambda g: model.initial_state(1, g, dtype=torch.float64)[0],
                    cfg.seed, members, "init")
    theta_d = theta.to(dtype=dtype, device=device)
    x = x0.to(dtype=dtype, device=device)
    step = RefinedStepper(model, dt, cfg.max_refinements, members, "member")
    every = cfg.save_every
    with torch.no_grad(), progress(cfg.spinup + cfg.steps, desc) as bar:
        # the spin-up in saved-interval pieces, so that a failure is redone from close by
        for s0 in range(0, cfg.spinup, every):
            n = min(every, cfg.spinup - s0)
            x = step(x, theta_d, n, "in the spin-up")
            bar.update(n)
        frames = [x]
        for k in range(1, cfg.steps // every + 1):
            x = step(x, theta_d, every, f"by saved time {k}")
            frames.append(x)
            bar.update(every)
    traj = torch.stack(frames, dim=1)
    refined.update(step.refined())
    t0 = cfg.spinup * dt
    time = t0 + dt * every * np.arange(traj.shape[1])
    return traj, theta, time


def simulate(cfg: SimulateConfig, out: str | Path, overwrite: bool = False) -> xr.Dataset:
    """Run ``cfg`` and write the result to ``out`` (``.nc`` or ``.zarr``) with its config beside."""
    out = check_output(out, overwrite)
    refined: dict[int, int] = {}
    traj, theta, time = run_ensemble(cfg, refined=refined)
    model = cfg.model.build()
    text = dump(cfg)
    ds = trajectory_dataset(model, traj, theta, time, attrs={
        "config": text, "seed": cfg.seed, "dt": cfg.model.dt,
        "save_every": cfg.save_every, "spinup_steps": cfg.spinup,
        # members integrated at dt / 2**halvings from a failing interval on (JSON: str keys)
        "refined": json.dumps({str(k): v for k, v in sorted(refined.items())}),
    })
    write_dataset(ds, out, text)
    return ds
