"""``scoreda simulate``: integrate an ensemble of one model and store it as a labelled dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import xarray as xr

from kernels.streams import per_member
from pipeline.config import SimulateConfig, dump
from pipeline.datasets import trajectory_dataset
from pipeline.runtime import compute_device, progress
from pipeline.storage import check_output, write_dataset


class DivergenceError(RuntimeError):
    """A member's state became non-finite."""


def run_ensemble(
    cfg: SimulateConfig, desc: str = "simulate"
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Integrate the ensemble that ``cfg`` describes.

    Member i's θ and initial state come from the streams ``(seed, "theta", i)`` and
    ``(seed, "init", i)``, so any member can be reproduced alone.

    Returns:
        trajectories ``(B, T, *state_shape)``, θ ``(B, P)`` and saved times ``(T,)``.
    """
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
    with torch.no_grad(), progress(cfg.spinup + cfg.steps, desc) as bar:
        x = model.advance(x, theta_d, cfg.spinup, dt, callback=bar.update)
        traj = model.rollout(x, theta_d, cfg.steps, save_every=cfg.save_every, dt=dt,
                             callback=bar.update)
    finite = torch.isfinite(traj.flatten(1)).all(dim=1)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        raise DivergenceError(f"member {bad} became non-finite (dt={dt} too large for this "
                              f"model/θ?); nothing was written")
    t0 = cfg.spinup * dt
    time = t0 + dt * cfg.save_every * np.arange(traj.shape[1])
    return traj, theta, time


def simulate(cfg: SimulateConfig, out: str | Path, overwrite: bool = False) -> xr.Dataset:
    """Run ``cfg`` and write the result to ``out`` (``.nc`` or ``.zarr``) with its config beside."""
    out = check_output(out, overwrite)
    traj, theta, time = run_ensemble(cfg)
    model = cfg.model.build()
    text = dump(cfg)
    ds = trajectory_dataset(model, traj, theta, time, attrs={
        "config": text, "seed": cfg.seed, "dt": cfg.model.dt,
        "save_every": cfg.save_every, "spinup_steps": cfg.spinup,
    })
    write_dataset(ds, out, text)
    return ds
