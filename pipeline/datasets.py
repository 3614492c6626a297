"""Labelled xarray views of model trajectories (named dims, coords, CF attributes)."""

from __future__ import annotations

import datetime as _dt
from typing import Any

import numpy as np
import torch
import xarray as xr

from kernels.dynamics import Dynamics


def software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scoreda")
    except PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


def trajectory_dataset(
    model: Dynamics,
    traj: torch.Tensor,
    theta: torch.Tensor,
    time: np.ndarray,
    attrs: dict[str, Any] | None = None,
) -> xr.Dataset:
    """Wrap trajectories in a Dataset.

    Args:
        model: the model that produced them.
        traj: ``(B, T, *state_shape)``.
        theta: ``(B, P)`` natural-space parameters of each member.
        time: ``(T,)`` model times of the saved states.
        attrs: extra global attributes (config text, seeds...).

    Returns:
        Dataset with one data variable per model variable, dims ``(member, time, *space)``,
        ``theta(member, param)`` and one variable per parameter, with CF attributes.
    """
    data = traj.detach().to("cpu").numpy()
    coords: dict[str, Any] = {
        "member": ("member", np.arange(data.shape[0]), {"long_name": "ensemble member"}),
        "time": ("time", np.asarray(time, dtype=np.float64),
                 {"long_name": "model time", "units": "1", "axis": "T"}),
        "param": ("param", np.array(model.param_names, dtype=object),
                  {"long_name": "model parameter name"}),
    }
    state_coords = {k: v.detach().cpu().numpy() for k, v in model.state_coords().items()}
    dims = model.state_dims
    variables: dict[str, Any] = {}
    if len(model.variables) > 1:
        # first state axis indexes the physical variables: store each as its own variable
        space = dims[1:]
        for i, var in enumerate(model.variables):
            variables[var] = (("member", "time", *space), data[:, :, i],
                              {"long_name": var, "units": model.state_units})
    else:
        space = dims
        variables[model.variables[0]] = (("member", "time", *space), data,
                                         {"long_name": model.variables[0],
                                          "units": model.state_units})
    for d in space:
        if d in state_coords:
            coords[d] = (d, state_coords[d], {"long_name": d})
    th = theta.detach().to("cpu", torch.float64).numpy()
    variables["theta"] = (("member", "param"), th, {"long_name": "model parameters per member"})
    for j, p in enumerate(model.params):
        variables[f"theta_{p.name}"] = (("member",), th[:, j], {
            "long_name": p.description or p.name, "units": p.units,
            "truth": p.truth, "transform": p.transform,
        })
    base = {
        "Conventions": "CF-1.8",
        "model": model.name,
        "state_shape": list(model.state_shape),
        "software": f"scoreda {software_version()}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    base.update(attrs or {})
    return xr.Dataset(variables, coords=coords, attrs=base)
